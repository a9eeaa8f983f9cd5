"""Start and stop the processes ppsehr runs locally (guards, SuperLink, SuperNodes, flwr CLI).

Every Flower process gets telemetry and update checks switched off. Each child runs in its
own process group, so stopping it by PID also stops what it spawned; Flower starts
flwr-serverapp and flwr-clientapp in sessions of their own, so those descendants are found
(Linux /proc) and stopped by PID as well.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PpsehrError

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def usable_cores(cap: int = 4) -> int:
    """CPUs this process may run on (its affinity where known), at least 1, at most `cap`."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cap, n))


def fork_call(child) -> int:
    """Fork; the child runs `child()` and exits with its code (a SystemExit's, 1 on any other
    exception, whose traceback it prints) without running this process's cleanup. Returns the
    child's PID in the parent."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        result = child()
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def flower_env(flwr_home: str | Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a Flower process: telemetry and update checks off, and this interpreter's
    scripts directory first on PATH, so that ppsehr installed in a virtualenv that was never
    activated (as pipx installs tools) finds Flower's executables, and so do the processes Flower
    spawns itself (flwr-serverapp, flwr-clientapp, flower-superexec)."""
    env = dict(os.environ, **FLOWER_ENV, **extra)
    scripts = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if scripts not in path.split(os.pathsep):
        env["PATH"] = scripts + (os.pathsep + path if path else "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def command(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """argv with its program resolved on env's PATH (or this interpreter's scripts directory);
    a clear error if it is not installed."""
    if os.sep in argv[0]:
        return argv
    search = (env or flower_env()).get("PATH")
    found = shutil.which(argv[0], path=search)
    if found is None:
        raise PpsehrError(f"{argv[0]!r} was not found beside {sys.executable} nor on PATH; install ppsehr's "
                          "dependencies into this environment (`pip install ppsehr`, which brings flwr==1.39.0)")
    return [found, *argv[1:]]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: "Managed | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode}; see {proc.log}:\n{proc.tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s" + (f"; see {proc.log}" if proc else ""))


@dataclass
class Managed:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """Processes started together and stopped together (reverse order), by PID."""

    log_dir: Path
    procs: list[Managed] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None) -> Managed:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as f:
            popen = subprocess.Popen(command(argv, env), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=cwd, start_new_session=True)
        m = Managed(name, popen, log)
        self.procs.append(m)
        return m

    def stop(self, grace: float = 5.0) -> None:
        spawned = _descendants({m.pid for m in self.procs})
        for m in reversed(self.procs):
            _signal_group(m.pid, signal.SIGTERM)
        for pid in spawned:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for m in reversed(self.procs):
            try:
                m.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(m.pid, signal.SIGKILL)  # whatever is left of the group (children too)
            try:
                m.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        while spawned and time.monotonic() < deadline:  # not our children: poll until gone (or a zombie)
            spawned = {pid for pid in spawned if _alive(pid)}
            time.sleep(0.05)
        for pid in spawned:
            _signal(pid, signal.SIGKILL)
        self.procs.clear()

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc; empty elsewhere)."""
    out = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def _descendants(roots: set[int]) -> set[int]:
    """Every live process below `roots` (children, grandchildren, ...)."""
    parents = _parents()
    found, frontier = set(), set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


_FLWR_CLI_SCRIPT = r"""
import json, os, sys, tempfile
import click
from flwr.cli.app import app
proto = os.fdopen(os.dup(1), "w")  # replies; whatever the CLI prints (fd 1 and 2) is captured per command
proto.write("ready\n"); proto.flush()
for line in sys.stdin:
    args, code = json.loads(line), 0
    with tempfile.TemporaryFile("w+") as tmp:
        sys.stdout.flush(); sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(tmp.fileno(), 1); os.dup2(tmp.fileno(), 2)
        try:
            result = app(args, prog_name="flwr", standalone_mode=False)
            code = result if isinstance(result, int) else 0
        except click.exceptions.ClickException as e:
            e.show(); code = e.exit_code
        except click.exceptions.Exit as e:
            code = e.exit_code
        except click.exceptions.Abort:
            code = 1
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:
            print(f"{type(e).__name__}: {e}"); code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2); os.close(saved[0]); os.close(saved[1])
        tmp.seek(0)
        output = tmp.read()
    proto.write(json.dumps({"code": code, "output": output}) + "\n"); proto.flush()
"""


class FlwrCli:
    """The `flwr` command line in one long-lived process: Flower is imported once (1-2 s of CPU),
    not once per command. `run(args)` gives (exit code, output) as `flwr ARGS` would."""

    def __init__(self, env: dict[str, str], group: ProcessGroup | None = None):
        import threading

        self._lock = threading.Lock()
        argv = [sys.executable, "-c", _FLWR_CLI_SCRIPT]
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=env, text=True, start_new_session=True)
        self._ready = False
        if group is not None:  # stopped with the other processes
            group.procs.append(Managed("flwr-cli", self.popen, group.log_dir / "flwr-cli.log"))

    def run(self, args: list[str], timeout: float = 120) -> tuple[int, str]:
        import json

        with self._lock:
            if not self._ready:
                line = self.popen.stdout.readline()
                if line.strip() != "ready":
                    raise RuntimeError(f"the flwr CLI process did not start: {line}{self.popen.stdout.read()[-2000:]}")
                self._ready = True
            self.popen.stdin.write(json.dumps(list(args)) + "\n")
            self.popen.stdin.flush()
            line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"the flwr CLI process exited (code {self.popen.poll()})")
        reply = json.loads(line)
        return int(reply["code"]), str(reply["output"])

    def close(self) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.stdin.close()
                self.popen.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                _signal_group(self.popen.pid, signal.SIGKILL)
