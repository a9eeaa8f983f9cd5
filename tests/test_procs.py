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
