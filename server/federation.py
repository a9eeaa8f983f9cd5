"""Submit a release to a Flower SuperLink with the `flwr` CLI and follow it to the end.

The Flower app (FAB) is built from a directory that holds nothing but a pyproject.toml naming
the installed ServerApp and ClientApp: no site data, keys or configuration can ride along.
`flwr run` returns as soon as the run starts (and exits 0 even when the ServerApp fails), so
the outcome is read from the job's events file, with `flwr ls` as a backstop.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..common.errors import PpsehrError
from ..common.procs import FlwrCli, command, flower_env

if TYPE_CHECKING:
    from .pipeline import ReleaseJob

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "ppsehr-release"
version = "1.0.0"
description = "ppsehr coordinator ServerApp and site ClientApp relay (code comes from the installed ppsehr package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "ppsehr"

[tool.flwr.app.components]
serverapp = "ppsehr.server.serverapp:app"
clientapp = "ppsehr.client.relay:app"

[tool.flwr.app.config]
job = ""
"""


class RunFailed(PpsehrError):
    pass


def write_app_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "pyproject.toml").write_text(APP_PYPROJECT)
    return path


def write_flwr_home(home: Path, connection: str, address: str, root_certificates: str | None = None) -> Path:
    """A private FLWR_HOME whose config.toml names one SuperLink connection."""
    home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n'
                                      f'address = "{address}"\n{tls}\n')
    return home


def _flwr(args: list[str], flwr_home: Path, cli: FlwrCli | None, timeout: float) -> tuple[int, str]:
    """`flwr ARGS`: through a running FlwrCli process if given, else a fresh `flwr` process."""
    if cli is not None:
        return cli.run(args, timeout)
    env = flower_env(flwr_home)
    res = subprocess.run(command(["flwr", *args], env), env=env, capture_output=True, text=True, timeout=timeout)
    return res.returncode, res.stdout + res.stderr


def submit(job_path: Path, app_dir: Path, flwr_home: Path, connection: str,
           federation_config: dict[str, object] | None = None, cli: FlwrCli | None = None) -> int:
    """Start the run; return its run id. `federation_config` goes to `flwr run --federation-config`
    (a simulation SuperLink's settings, e.g. {"num-supernodes": 100}); `cli` is a FlwrCli started
    with this FLWR_HOME (common/procs.py), which saves starting Flower's CLI again."""
    cmd = ["run", str(app_dir), connection, "--run-config", f'job="{job_path}"', "--format", "json"]
    if federation_config:
        cmd += ["--federation-config", " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config.items())]
    code, output = _flwr(cmd, flwr_home, cli, 120)
    m = re.search(r'"run-id"\s*:\s*"?(\d+)', output) or re.search(r"run (\d+)", output)
    if code != 0 or not m:
        raise RunFailed(f"`flwr run` did not start a run (exit {code}):\n{output[-4000:]}")
    return int(m.group(1))


def run_status(run_id: int, flwr_home: Path, connection: str, cli: FlwrCli | None = None) -> str:
    _, output = _flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], flwr_home, cli, 60)
    try:
        runs = json.loads(output[output.find("{"):]).get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"
    except (json.JSONDecodeError, AttributeError, IndexError):
        return "unknown"


def follow(job: ReleaseJob, run_id: int, flwr_home: Path, connection: str, timeout: float,
           on_event: Callable[[dict], None], cli: FlwrCli | None = None) -> dict:
    """Stream the job's events until it is done or failed; return the final event."""
    events = Path(job.events or "")
    seen, last_change, deadline = 0, time.monotonic(), time.monotonic() + timeout

    def read() -> dict | None:
        nonlocal seen, last_change
        lines = events.read_text().splitlines() if events.exists() else []
        complete = [line for line in lines[seen:] if line.endswith("}")]  # a line being written waits
        for line in complete:
            ev = json.loads(line)
            on_event(ev)
            seen += 1
            last_change = time.monotonic()
            if ev.get("stage") == "done":
                return ev
            if ev.get("stage") == "failed":
                raise RunFailed(ev.get("message", "release failed"))
        return None

    while time.monotonic() < deadline:
        if (final := read()) is not None:
            return final
        if time.monotonic() - last_change > 20:
            status = run_status(run_id, flwr_home, connection, cli)
            if status.startswith("finished"):
                if (final := read()) is not None:  # it may have finished while we asked
                    return final
                raise RunFailed(f"run {run_id} ended ({status}) without finishing the release; see `flwr log {run_id}`")
            last_change = time.monotonic()
        time.sleep(0.1)
    raise RunFailed(f"run {run_id} did not finish within {timeout:g} s")
