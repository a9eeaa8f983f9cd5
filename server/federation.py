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
from ..common.procs import flower_env

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


def submit(job_path: Path, app_dir: Path, flwr_home: Path, connection: str,
           federation_config: dict[str, object] | None = None) -> int:
    """Start the run; return its run id. `federation_config` goes to `flwr run --federation-config`
    (a simulation SuperLink's settings, e.g. {"num-supernodes": 100})."""
    cmd = ["flwr", "run", str(app_dir), connection, "--run-config", f'job="{job_path}"', "--format", "json"]
    if federation_config:
        cmd += ["--federation-config", " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config.items())]
    res = subprocess.run(cmd, env=flower_env(flwr_home), capture_output=True, text=True, timeout=120)
    m = re.search(r'"run-id"\s*:\s*"?(\d+)', res.stdout) or re.search(r"run (\d+)", res.stdout + res.stderr)
    if res.returncode != 0 or not m:
        raise RunFailed(f"`flwr run` did not start a run (exit {res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return int(m.group(1))


def run_status(run_id: int, flwr_home: Path, connection: str) -> str:
    res = subprocess.run(["flwr", "ls", connection, "--run-id", str(run_id), "--format", "json"],
                         env=flower_env(flwr_home), capture_output=True, text=True, timeout=60)
    try:
        runs = json.loads(res.stdout).get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"
    except (json.JSONDecodeError, AttributeError, IndexError):
        return "unknown"


def follow(job: ReleaseJob, run_id: int, flwr_home: Path, connection: str, timeout: float,
           on_event: Callable[[dict], None]) -> dict:
    """Stream the job's events until it is done or failed; return the final event."""
    events = Path(job.events or "")
    seen, last_change, deadline = 0, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = events.read_text().splitlines() if events.exists() else []
        for line in lines[seen:]:
            ev = json.loads(line)
            on_event(ev)
            if ev.get("stage") == "done":
                return ev
            if ev.get("stage") == "failed":
                raise RunFailed(ev.get("message", "release failed"))
        if len(lines) > seen:
            seen, last_change = len(lines), time.monotonic()
        elif time.monotonic() - last_change > 20:
            status = run_status(run_id, flwr_home, connection)
            if status.startswith("finished"):
                raise RunFailed(f"run {run_id} ended ({status}) without finishing the release; see `flwr log {run_id}`")
            last_change = time.monotonic()
        time.sleep(0.2)
    raise RunFailed(f"run {run_id} did not finish within {timeout:g} s")
