"""Flower ServerApp: runs one release over the deployment engine.

The run config names a job file (written by `ppsehr coordinator release` or `ppsehr demo`);
progress and the outcome are appended to the job's events file as JSON lines.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .pipeline import Events, ReleaseJob, run_release
from .measure.transport import FlowerTransport

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    job = ReleaseJob.load(str(context.run_config["job"]))
    events = Events(job.events)
    events("coordinator ServerApp started", stage="start")
    try:
        run_release(job, FlowerTransport(grid, job.min_sites, job.wait_sites_timeout), events)
    except Exception as e:
        events(f"release failed: {e}", stage="failed", error=f"{type(e).__name__}: {e}")
        raise
