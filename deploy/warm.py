"""A warm SuperExec: Flower's task loop with pre-imported app processes, for `--isolation process`.

Flower's own `flower-superexec` starts a fresh `flwr-clientapp` (or `flwr-serverapp`) process for
every message, and each pays 1.5-3 s of CPU importing Flower and the app before it reads its
message. This process runs the same loop (AcquireTask on each Runtime API, then Flower's
`AutoExecPlugin` builds the launch spec), imports Flower's app entry points and the ppsehr apps
once, and forks a child per task. The child runs exactly what the command line would
(`flwr-clientapp` / `flwr-serverapp` with the same arguments and token) and exits, so every
message still gets a process of its own; it only skips the imports. Other task types are
started cold, as Flower starts them.

The Runtime APIs to serve are read from a file (one `ADDRESS [ROOT_CA]` per line; reread when it
changes), so SuperNodes can join later. `deploy/local.py` runs one for the whole loopback demo;
at a hospital, run one next to each SuperNode (started with `--isolation process`):

    python -m ppsehr.deploy.warm --addresses runtime.txt --preload ppsehr.client.relay
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
from pathlib import Path

from ..common.procs import fork_call

DEFAULT_POLL = 0.2  # seconds between AcquireTask calls on each Runtime API (Flower's SuperExec: 1 s)
ENTRY_POINTS = {"flwr-clientapp": ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp"),
                "flwr-serverapp": ("flwr.superlink.cli.flwr_serverapp", "flwr_serverapp")}


class ForkExecutor:
    """Flower's SubprocessExecutor, with ClientApp and ServerApp processes forked from this warm one."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.cold = SubprocessExecutor()
        self.entries = {cmd: getattr(importlib.import_module(mod), fn) for cmd, (mod, fn) in ENTRY_POINTS.items()}
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return supported_task_types, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None) -> None:
        return None

    def launch(self, spec):
        from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND
        from flwr.supercore.superexec.executor.types import LaunchResult

        command = TASK_TYPE_TO_COMMAND[spec.task_type]
        entry = self.entries.get(command)
        if entry is None:
            return self.cold.launch(spec)
        argv = [command, TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address, "--token", spec.token]
        if spec.insecure:
            argv.append("--insecure")
        elif spec.root_certificates_path is not None:
            argv += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            argv += ["--parent-pid", str(spec.parent_pid)]
        def child() -> None:  # exactly the command line's work
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            if spec.suppress_output:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            sys.argv = argv
            entry()

        self.children.add(fork_call(child))
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        self.reconcile()


def _read_addresses(path: Path) -> list[tuple[str, str | None]]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()
        if parts:
            out.append((parts[0], parts[1] if len(parts) > 1 else None))
    return out


def serve(addresses: Path, preload: list[str], poll: float = DEFAULT_POLL, pull_backoff: float | None = None) -> None:
    """Serve the Runtime APIs listed in `addresses` until SIGTERM/SIGINT; with `pull_backoff`, the apps
    it forks start Flower's object-pull back-off at that many seconds instead of 1."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.plugin import AutoExecPlugin

    if pull_backoff:  # inherited by every forked ClientApp and ServerApp (deploy/flower_waits.py)
        from .flower_waits import shorten

        shorten(pull_backoff)
    executor = ForkExecutor()
    for module in preload:  # the apps' own imports, paid once here instead of once per message
        importlib.import_module(module)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    links: dict[tuple[str, str | None], tuple] = {}
    seen_mtime = None
    print(f"warm superexec {os.getpid()} ready (preloaded {', '.join(preload) or 'nothing'})", flush=True)
    while not stop:
        mtime = addresses.stat().st_mtime_ns if addresses.exists() else None
        if mtime != seen_mtime:
            seen_mtime = mtime
            for key in _read_addresses(addresses):
                if key not in links:
                    address, ca = key
                    client = RuntimeHttpClient.from_server_address(
                        server_address=address, insecure=ca is None, root_certificates=ca,
                        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")], retry_invoker=None)
                    plugin = AutoExecPlugin(runtime_api_address=address, insecure=ca is None, root_certificates_path=ca,
                                            runtime_dependency_install=False, executor=executor)
                    links[key] = (client, plugin)
        executor.reconcile()
        for (address, ca), (client, plugin) in links.items():
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=sorted(plugin.supported_task_types)))
            except Exception:  # not up yet, or gone: try again next round
                continue
            if res.HasField("task") and res.token:
                plugin.launch_task(token=res.token, task=res.task)
        time.sleep(poll)
    executor.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ppsehr.deploy.warm", description=__doc__.split("\n\n")[0])
    p.add_argument("--addresses", required=True, help="file of Runtime API addresses, one `ADDRESS [ROOT_CA]` per line")
    p.add_argument("--preload", action="append", default=[], help="module to import before serving (repeatable)")
    p.add_argument("--poll", type=float, default=DEFAULT_POLL, help=f"seconds between polls (default {DEFAULT_POLL})")
    p.add_argument("--pull-backoff", type=float, default=None,
                   help="first back-off (s) of the apps' object pulls (default: Flower's 1 s; loopback: 0.1)")
    args = p.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    serve(Path(args.addresses), args.preload, max(0.01, args.poll), args.pull_backoff)
    return 0


if __name__ == "__main__":
    sys.exit(main())
