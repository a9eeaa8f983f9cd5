"""ProcessGroup stops what it started, also descendants that left its process group (as Flower's
flwr-serverapp and flwr-clientapp do: Flower starts them in sessions of their own)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from ppsehr.common import procs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="descendants are found through /proc")
def test_stop_also_stops_descendants_in_their_own_session(tmp_path):
    group = procs.ProcessGroup(tmp_path)
    leader = group.start("spawner", ["sh", "-c", "setsid sleep 300 & sleep 300"])
    deadline = time.monotonic() + 10
    while len(procs._descendants({leader.pid})) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    spawned = procs._descendants({leader.pid})
    assert len(spawned) == 2 and all(procs._alive(p) for p in spawned)
    group.stop(grace=3)
    assert not any(procs._alive(p) for p in spawned | {leader.pid})


def test_flower_executables_are_found_beside_the_interpreter_and_a_missing_one_is_named(monkeypatch):
    import sys
    from pathlib import Path

    from ppsehr.common.errors import PpsehrError

    monkeypatch.setenv("PATH", "/nonexistent")
    env = procs.flower_env()
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert Path(procs.command(["flower-superlink", "--help"], env)[0]).parent == Path(sys.executable).parent
    with pytest.raises(PpsehrError, match="'flower-no-such-tool' was not found beside"):
        procs.command(["flower-no-such-tool"], env)


def test_loopback_flower_waits_are_shortened_in_that_process_only():
    """deploy/flower_waits.py caps the SuperNode loop's sleeps and starts the object-pull back-off at
    `poll`, in the process that asks (the demo's SuperNodes and warm apps), not in Flower itself."""
    import subprocess
    import sys

    probe = ("import time; from ppsehr.deploy import flower_waits as w; "
             "from flwr.supercore.inflatable import inflatable_utils as u; "
             "from flwr.supernode import start_client_internal as loop; "
             "before = dict(u.pull_objects.__kwdefaults__); assert w.shorten(0.05, supernode=True); "
             "t = time.monotonic(); loop.time.sleep(3); slept = time.monotonic() - t; "
             "print(before['initial_backoff'], u.pull_objects.__kwdefaults__['initial_backoff'], "
             "u.pull_and_inflate_object_from_tree.__kwdefaults__['initial_backoff'], slept < 0.5, time.sleep is not loop.time.sleep)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0.05", "0.05", "True", "True"]
    from flwr.supercore.inflatable import inflatable_utils

    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 1  # this process: untouched
