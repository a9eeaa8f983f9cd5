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


LLM_GRACE = 120.0  # seconds past an LLM step's own budget before `follow` gives up on it
AFTER_LLM = 300.0  # seconds the release has, at least, after its LLM stage (export, report, signing)


def follow(job: ReleaseJob, run_id: int, flwr_home: Path, connection: str, timeout: float,
           on_event: Callable[[dict], None], cli: FlwrCli | None = None) -> dict:
    """Stream the job's events until it is done or failed; return the final event.

    `timeout` bounds the release's own work (planning, the sites' measurements, the model, the
    files); LLM steps (events whose stage starts with "llm") run on their own clock: the budget
    their first event announces (`budget_s`, else the job's LLM time budget) plus a grace. So a
    slow LLM cannot make a release fail after the sites have paid for its measurements, and the
    time it takes does not count against the sites' deadline."""
    events = Path(job.events or "")
    llm_budget = job.llm_config().time_budget if getattr(job, "llm", None) else 0.0  # an EvaluationJob has no LLM
    seen, last_change = 0, time.monotonic()
    spent, tick = 0.0, time.monotonic()  # time outside LLM steps
    llm_until: float | None = None  # while in an LLM step: when to give up on it
    llm_stage = ""
    while True:
        now = time.monotonic()
        if llm_until is None:
            spent += now - tick
        tick = now
        if llm_until is not None and now > llm_until:
            raise RunFailed(f"run {run_id}: the LLM step ({llm_stage}) ran past its time budget and grace; "
                            f"see `flwr log {run_id}`")
        if llm_until is None and spent > timeout:
            raise RunFailed(f"run {run_id} did not finish within {timeout:g} s (LLM steps not counted)")
        text = events.read_text() if events.exists() else ""
        lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]  # complete lines only
        for line in lines[seen:]:
            ev = json.loads(line)
            on_event(ev)
            stage = str(ev.get("stage", ""))
            if stage == "done":
                return ev
            if stage == "failed":
                raise RunFailed(ev.get("message", "release failed"))
            if stage.startswith("llm"):
                if llm_until is None or stage != llm_stage:  # a new LLM step: its own clock
                    budget = ev.get("budget_s", llm_budget)
                    llm_until = None if not budget else time.monotonic() + float(budget) + max(LLM_GRACE, 0.25 * float(budget))
                    llm_stage = stage
                    if llm_until is None:
                        llm_until = float("inf")
            elif llm_until is not None:  # back from an LLM step: the rest has at least AFTER_LLM seconds
                llm_until, llm_stage = None, ""
                spent = min(spent, max(0.0, timeout - AFTER_LLM))
        if len(lines) > seen:
            seen, last_change = len(lines), time.monotonic()
        elif time.monotonic() - last_change > 20:
            status = run_status(run_id, flwr_home, connection, cli)
            if status.startswith("finished"):
                done = events.read_text() if events.exists() else ""
                if '"stage": "done"' in done or '"stage": "failed"' in done:
                    continue  # it finished while we asked: read the rest
                raise RunFailed(f"run {run_id} ended ({status}) without finishing the release; see `flwr log {run_id}`")
            last_change = time.monotonic()
        time.sleep(0.1)
