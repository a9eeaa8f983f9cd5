"""Flower ServerApp: runs one release (or one evaluation of a release) over the deployment engine.

The run config names a job file (written by `ppsehr coordinator release` or `ppsehr demo`);
progress and the outcome are appended to the job's events file as JSON lines.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .pipeline import Events, ReleaseJob, run_release
from .measure.transport import FlowerTransport
from .release import figures

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = str(context.run_config["job"])
    if json.loads(Path(path).read_text()).get("kind") == "evaluation":  # a federated evaluation of a release
        from .evaluate.run import EvaluationJob, run_evaluation

        job, run = EvaluationJob.load(path), run_evaluation
    else:
        job, run = ReleaseJob.load(path), run_release
    events = Events(job.events)
    events("coordinator ServerApp started", stage="start")
    # a release's report figures are drawn on worker processes that start now, while the sites answer
    drawing = figures.workers() if run is run_release and job.output.report else nullcontext()
    try:
        with drawing:
            run(job, FlowerTransport(grid, job.min_sites, job.wait_sites_timeout), events)
    except Exception as e:
        events(f"{'evaluation' if run is not run_release else 'release'} failed: {e}", stage="failed",
               error=f"{type(e).__name__}: {e}")
        raise
