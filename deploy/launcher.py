"""A loopback consortium's SuperLink, site guards and SuperNodes, forked from one warm launcher.

At real hospitals every guard and SuperNode is a process of its own that imports its code once.
On one machine (the demo, the tests) a SuperLink (1.7 s of CPU to import Flower), four guards
(0.5 s each to import ppsehr's guard) and four SuperNodes (1.6 s each) would import the same code
at once, on the same cores as the coordinator. The launcher imports each kind's code once, in the
order asked for, and forks a child per request. A child is still a process of its own: it starts
a session of its own (so it is stopped by its PID like any process of a ProcessGroup), logs to its
own file, and runs exactly what its command line would: `flower-superlink ARGS`, `ppsehr site
serve ARGS`, or `flower-supernode ARGS` with the loopback waits of deploy/flower_waits.py.

    python -m ppsehr.deploy.launcher --poll 0.1     (one JSON request per stdin line; replies on stdout)
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..common.procs import Managed, ProcessGroup, _alive, fork_call
from .flower_waits import DEFAULT_POLL

# what each kind of child imports, in the order the launcher warms them up (guards are asked for first)
PRELOADS = {"superlink": ("flwr.superlink.cli",),
            "guard": ("ppsehr.client.guard", "ppsehr.deploy.cli", "ppsehr.common.source", "duckdb"),
            "supernode": ("flwr.supernode.cli",)}


def _run_child(kind: str, argv: list[str]) -> int:
    if kind == "guard":  # `ppsehr site serve ARGS`, as its command line runs it
        import runpy

        sys.argv = ["ppsehr", "site", "serve", *argv]
        runpy.run_module("ppsehr.deploy.cli", run_name="__main__", alter_sys=True)
        return 0
    if kind == "superlink":
        from flwr.superlink.cli import flower_superlink

        sys.argv = ["flower-superlink", *argv]
        flower_superlink()
        return 0
    from .supernode import run_supernode

    run_supernode(argv)
    return 0


def _fork(request: dict) -> int:
    def child() -> int:  # a session of its own, its own log, then what its command line would run
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        return _run_child(request["kind"], list(request["argv"]))

    return fork_call(child)


def serve(poll: float) -> None:
    """Warm up each kind in turn, forking whatever was asked for meanwhile; then fork on request
    until stdin closes, and stay (reaping children) until stopped."""
    warmed: set[str] = set()

    def warm(kind: str) -> None:
        if kind not in warmed:
            if kind == "supernode":
                from .flower_waits import shorten

                shorten(poll, supernode=True)  # inherited by every SuperNode forked from here
            for module in PRELOADS[kind]:
                importlib.import_module(module)
            warmed.add(kind)

    replies = os.fdopen(os.dup(1), "w")
    pending, buffer, closed = [], b"", False

    def read(timeout: float | None) -> None:
        nonlocal buffer, closed
        if closed or not select.select([0], [], [], timeout)[0]:
            return
        chunk = os.read(0, 65536)
        closed = not chunk
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        pending.extend(json.loads(line) for line in lines if line.strip())

    def answer(timeout: float | None) -> None:  # fork whatever has been asked for by now
        read(timeout)
        while pending:
            request = pending.pop(0)
            warm(request["kind"])
            replies.write(json.dumps({"pid": _fork(request)}) + "\n")
            replies.flush()
            read(0)

    for kind in PRELOADS:
        warm(kind)
        replies.write(f"ready {kind}\n")
        replies.flush()
        answer(0)
    while not closed:
        answer(None)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


class Forked:
    """What ProcessGroup needs of a Popen, for a child of the launcher (not of this process)."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None and not _alive(self.pid):
            self.returncode = -1  # its exit status went to the launcher
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Launcher:
    """The launcher as a member of a ProcessGroup. `start(kind, name, argv)` forks a SuperLink, a guard
    or a SuperNode logging to <log_dir>/<name>.log and adds it to the group (stopped with it)."""

    def __init__(self, group: ProcessGroup, env: dict[str, str], poll: float = DEFAULT_POLL):
        self.group = group
        group.log_dir.mkdir(parents=True, exist_ok=True)
        log = group.log_dir / "launcher.log"
        with open(log, "ab") as f:
            self.popen = subprocess.Popen([sys.executable, "-m", "ppsehr.deploy.launcher", "--poll", str(poll)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f, env=env, text=True,
                                          start_new_session=True)
        self.managed = Managed("launcher", self.popen, log)
        group.procs.append(self.managed)

    def start(self, kind: str, name: str, argv: list[str]) -> Managed:
        if kind not in PRELOADS:
            raise ValueError(f"the launcher forks {', '.join(PRELOADS)}, not {kind!r}")
        log = Path(self.group.log_dir) / f"{name}.log"
        self.popen.stdin.write(json.dumps({"kind": kind, "argv": argv, "log": str(log)}) + "\n")
        self.popen.stdin.flush()
        while (reply := self.popen.stdout.readline()).startswith("ready"):
            pass
        if not reply:
            raise RuntimeError(f"the launcher exited (code {self.popen.poll()}); see {self.managed.log}:\n"
                               f"{self.managed.tail()}")
        child = Managed(name, Forked(int(json.loads(reply)["pid"])), log)
        self.group.procs.append(child)
        return child


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ppsehr.deploy.launcher", description=__doc__.split("\n\n")[0])
    p.add_argument("--poll", type=float, default=DEFAULT_POLL, help="the SuperNodes' loopback waits (s)")
    args = p.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    serve(max(0.01, args.poll))


if __name__ == "__main__":
    main()
