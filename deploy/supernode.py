"""`flower-supernode` with Flower's fixed waits shortened (deploy/flower_waits.py), for loopback
consortia (the demo and the tests).

    python -m ppsehr.deploy.supernode --poll 0.1 --superlink HOST:PORT ... (flower-supernode's arguments)

Same arguments, same process, same protocol as Flower's `flower-supernode`; only its idle poll
and object-pull back-off are `--poll` seconds. With `--fork` it is a launcher instead: it imports
Flower once (1.7 s of CPU) and forks one SuperNode per request line on stdin, so a loopback
consortium's SuperNodes start at once when the SuperLink is ready instead of each importing
Flower then (`Launcher`). Each SuperNode is still a process of its own, with its own arguments
and log, and stops with the launcher's process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .flower_waits import DEFAULT_POLL, PATCHED_FLOWER, shorten


def _run_supernode(args: list[str]) -> None:
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


def _serve_forks() -> None:
    """The launcher: for each stdin line {"argv": [...], "log": path}, fork a SuperNode; reply {"pid": N}."""
    import flwr.supernode.cli  # noqa: F401  (what every child would otherwise import itself)

    replies = os.fdopen(os.dup(1), "w")
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                _run_supernode(list(request["argv"]))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
    while True:  # stdin closed: keep the SuperNodes' parent alive until the group is stopped
        try:
            os.wait()
        except ChildProcessError:
            return


class Launcher:
    """A `--fork` launcher in a ProcessGroup: `start(name, argv)` forks a SuperNode logging to
    <log_dir>/<name>.log and returns its PID. Stopping the group stops the launcher and, as its
    descendants, every SuperNode it forked."""

    def __init__(self, group, env: dict[str, str], poll: float = DEFAULT_POLL):
        self.group = group
        group.log_dir.mkdir(parents=True, exist_ok=True)
        log = group.log_dir / "supernode-launcher.log"
        with open(log, "ab") as f:
            self.popen = subprocess.Popen([sys.executable, "-m", "ppsehr.deploy.supernode", "--poll", str(poll), "--fork"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f, env=env, text=True,
                                          start_new_session=True)
        from ..common.procs import Managed

        group.procs.append(Managed("supernode-launcher", self.popen, log))
        self._ready = False

    def start(self, name: str, argv: list[str]) -> int:
        if not self._ready:
            if self.popen.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the SuperNode launcher did not start (exit {self.popen.poll()}); see "
                                   f"{self.group.log_dir / 'supernode-launcher.log'}")
            self._ready = True
        self.popen.stdin.write(json.dumps({"argv": argv, "log": str(Path(self.group.log_dir) / f"{name}.log")}) + "\n")
        self.popen.stdin.flush()
        reply = self.popen.stdout.readline()
        if not reply:
            raise RuntimeError(f"the SuperNode launcher exited (code {self.popen.poll()})")
        return int(json.loads(reply)["pid"])


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    poll = DEFAULT_POLL
    if args[:1] == ["--poll"]:
        if len(args) < 2:
            raise SystemExit("--poll needs a number of seconds")
        try:
            poll = float(args[1])
        except ValueError:
            raise SystemExit(f"--poll {args[1]!r}: not a number of seconds") from None
        if not 0 < poll <= 3:
            raise SystemExit(f"--poll {poll}: give seconds in (0, 3]")
        args = args[2:]
    if not shorten(poll, supernode=True):
        import flwr

        print(f"ppsehr.deploy.supernode: Flower {flwr.__version__} is not {PATCHED_FLOWER}; "
              "running flower-supernode with its own poll", file=sys.stderr, flush=True)
    if args == ["--fork"]:
        _serve_forks()
    else:
        _run_supernode(args)


if __name__ == "__main__":
    main()
