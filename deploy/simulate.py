"""`ppsehr simulate`: a release over Flower's Simulation Engine with hundreds to thousands of sites.

The real ServerApp (`ppsehr.server.serverapp`) and the real ClientApp relay (`ppsehr.client.relay`)
run under Flower's simulation runtime: a SuperLink started with `--simulation`, `flwr run` with
`num-supernodes = N`, and Ray workers playing N virtual SuperNodes. A virtual SuperNode has no
guard process; its relay builds the site's guard in the worker process from the site config its
partition-id points at (the index travels in PPSEHR_SIMULATION_SITES, see client/relay.py) and
keeps it for later messages. Every answer is the guard's own: policy checks, OpenDP noise, the
ledger debit before anything leaves, signed summaries and receipts.

The sites' data is a simulated consortium (`bench.fidelity.simulated_dataset`); fidelity is
measured as `ppsehr bench fidelity` measures it, against the pooled real rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..common.procs import ProcessGroup, flower_env, free_port, wait_for_port

HOST = "127.0.0.1"
POLICY = {"max_rho_per_plan": 1e6, "max_marginals": 10_000, "max_cells": 10**7, "max_total_cells": 2 * 10**7,
          "max_plans_per_day": 100_000}


@dataclass
class SimulatedConsortium:
    """Keys, site configs (with their ledgers) and the partition index of a simulated consortium."""

    workdir: Path
    sites: list[str]
    keys: object  # common.keys.ConsortiumKeys
    index: Path  # JSON list of site config paths; partition-id i is sites[i]


def prepare(workdir: Path, mappings: dict[str, Path], dictionary: Path, lifetime_epsilon: float = 1000.0,
            delta: float = 1e-6, secure: bool = False) -> SimulatedConsortium:
    """Keys and one site config per site (mapping file -> site), and the partition index."""
    from ..common.keys import init_consortium
    from .local import write_site_config

    workdir = Path(workdir).resolve()
    sites = list(mappings)
    keys = init_consortium(workdir / "keys", sites, [HOST])
    paths = []
    for site in sites:
        peers = {p: keys.site_keys[p][1] for p in sites if p != site} if secure else None
        paths.append(str(write_site_config(workdir / "sites" / f"{site}.toml", site, dictionary, mappings[site],
                                           workdir / "state" / site, f"{HOST}:0", lifetime_epsilon, delta,
                                           keys.site_keys[site][0], [keys.coordinator_pub], POLICY, peers,
                                           min(3, len(sites)))))
    index = workdir / "sites.json"
    index.write_text(json.dumps(paths))
    return SimulatedConsortium(workdir, sites, keys, index)


class _PeakRSS:
    """Peak resident memory of this process tree (sampled from /proc every 0.5 s)."""

    def __init__(self, root_pids: Callable[[], set[int]]):
        self.root_pids, self.peak, self._stop = root_pids, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from ..common.procs import _descendants

        while not self._stop.wait(0.5):
            pids = self.root_pids()
            total = 0
            for pid in pids | _descendants(pids):
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                except OSError:
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self) -> "_PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run(consortium: SimulatedConsortium, dictionary: Path, out: Path, epsilon: float, seed: int | None = None,
        workers: int = 2, timeout: float = 7200, progress: Callable[[str], None] = lambda m: None,
        on_event: Callable[[dict], None] = lambda e: None, **options) -> dict:
    """One release over Flower's Simulation Engine; returns timings, memory and the final event.

    `options` are release options (site_variable, formats, report, ...: ReleaseJob.create)."""
    from ..server.federation import follow, submit, write_app_dir, write_flwr_home
    from ..server.pipeline import ReleaseJob

    work = consortium.workdir
    if options.get("secure_aggregation"):
        workers = 1  # a secure plan's one-time key lives in the guard that enrolled it: one worker holds them all
    # a few workers answer the virtual sites one after another: give a round time for all of them
    options.setdefault("reply_timeout", max(300.0, 5.0 * len(consortium.sites) / workers))
    group = ProcessGroup(work / "logs")
    control, fleet = free_port(), free_port()
    home = write_flwr_home(work / "flwr-home", "simulation", f"{HOST}:{control}")
    env = flower_env(home, PPSEHR_SIMULATION_SITES=str(consortium.index),
                     RAY_DEDUP_LOGS="0", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    job_dir = work / "jobs" / str(time.monotonic_ns())
    job_dir.mkdir(parents=True)
    job = ReleaseJob.create(dictionary=str(Path(dictionary).resolve()), out=str(Path(out).resolve()),
                            signing_key=str(consortium.keys.coordinator_key),
                            site_keys={s: str(consortium.keys.site_keys[s][1]) for s in consortium.sites},
                            epsilon=epsilon, seed=seed, coordinator="simulation-coordinator",
                            min_sites=len(consortium.sites), events=str(job_dir / "events.jsonl"), **options)
    job.validate()
    job.save(job_dir / "job.json")
    try:
        with _PeakRSS(lambda: {m.pid for m in group.procs}) as rss:
            superlink = group.start("superlink", [
                "flower-superlink", "--insecure", "--simulation", "--host", HOST, "--port", str(control),
                "--fleet-api-address", f"{HOST}:{fleet}", "--disable-runtime-dependency-installation"], env=env)
            wait_for_port(HOST, control, 120, superlink)
            timings["superlink_ready_s"] = time.monotonic() - t0
            run_id = submit(job_dir / "job.json", write_app_dir(job_dir / "app"), home, "simulation",
                            {"num-supernodes": len(consortium.sites), "backend": "ray",
                             "client-resources-num-cpus": 1, "init-args-num-cpus": workers})
            progress(f"run {run_id}: {len(consortium.sites)} virtual SuperNodes on {workers} Ray worker(s)")
            marks = {}

            def seen(ev: dict) -> None:
                marks.setdefault(ev.get("stage", ""), time.monotonic() - t0)
                on_event(ev)

            final = follow(job, run_id, home, "simulation", timeout, seen)
        timings.update({f"{k}_s": round(v, 2) for k, v in marks.items() if k in ("start", "aggregate", "synthesize", "done")})
        timings["wall_s"] = round(time.monotonic() - t0, 2)
        return {"final": final, "timings": timings, "peak_rss_bytes": rss.peak, "run_id": run_id}
    finally:
        group.stop()


def fidelity(ds, release_dir: Path) -> dict:
    """tvd1/tvd2/tvd3 of the released records against the pooled real rows (as `bench fidelity`)."""
    import numpy as np
    import pyarrow.csv as pacsv

    from ..server.model.records import cell_of
    from .bench.fidelity import tvds

    table = pacsv.read_csv(Path(release_dir) / "records.csv",
                           convert_options=pacsv.ConvertOptions(column_types={n: "string" for n in ds.dictionary.names}))
    synth = np.zeros((table.num_rows, len(ds.dictionary.names)), dtype=np.int64)
    for j, (name, var) in enumerate(ds.dictionary.variables.items()):
        col = table.column(name).combine_chunks().dictionary_encode()
        codes = np.array([cell_of(var, v or "") for v in col.dictionary.to_pylist()] or [0], dtype=np.int64)
        synth[:, j] = codes[col.indices.to_numpy(zero_copy_only=False)]
    real = ds.pooled()
    sizes = [ds.dictionary[n].size for n in ds.dictionary.names]
    return {"tvd1": tvds(real, synth, sizes, 1), "tvd2": tvds(real, synth, sizes, 2),
            "tvd3": tvds(real, synth, sizes, 3, sample=50) if len(sizes) >= 3 else float("nan"),
            "synthetic_rows": int(len(synth)), "real_rows": int(len(real))}


def simulate(sites: int, rows: int, attributes: int, epsilon: float, workdir: Path, out: Path,
             heterogeneity: float = 0.5, seed: int = 0, workers: int = 2,
             say: Callable[[str], None] = print, **options) -> dict:
    """Draw a simulated consortium, run one release through Flower's simulation, verify it, score it."""
    from ..server.release.bundle import verify_release
    from .bench.fidelity import simulated_dataset

    t0 = time.monotonic()
    say(f"drawing a simulated consortium: {sites} sites, {rows} rows, {attributes} attributes")
    ds = simulated_dataset(Path(workdir) / "data", sites, rows, attributes, heterogeneity, seed)
    consortium = prepare(Path(workdir) / "consortium", ds.mappings, ds.dictionary_path,
                         secure=bool(options.get("secure_aggregation")))
    prepared = time.monotonic() - t0
    say(f"consortium ready in {prepared:.1f} s; starting Flower's simulation runtime")
    result = run(consortium, ds.dictionary_path, out, epsilon, seed=seed, workers=workers, progress=say,
                 on_event=lambda e: say(f"  [{e.get('stage')}] {e.get('message', '')[:150]}"), **options)
    manifest = verify_release(result["final"]["out"])
    scores = fidelity(ds, Path(result["final"]["out"]))
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"sites": sites, "rows": rows, "attributes": attributes, "epsilon": epsilon, "workers": workers,
            "options": {k: v for k, v in options.items()}, "prepare_s": round(prepared, 2), **result["timings"],
            "peak_rss_bytes_flower": result["peak_rss_bytes"], "peak_rss_bytes_driver": self_rss,
            "sites_answered": len(manifest["sites"]), "sites_not_included": len(manifest["sites_not_included"]),
            **scores, "out": result["final"]["out"]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sites", type=int, default=100, help="virtual SuperNodes (sites), default 100")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows in all, split evenly over the sites")
    p.add_argument("--attributes", type=int, default=30)
    p.add_argument("--heterogeneity", type=float, default=0.5)
    p.add_argument("--epsilon", type=float, default=1.0, help="per site, at delta 1e-6")
    p.add_argument("--site-variable", choices=["model", "release", "pooled"], default="model")
    p.add_argument("--secure-aggregation", action="store_true", help="round 2 as masked sums (one Ray worker)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (CPUs) running the virtual SuperNodes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--formats", default="csv", help="record formats in the release (csv always)")
    p.add_argument("--report", action="store_true", help="include report.html and figures")
    p.add_argument("--out", default=None, help="release directory to create (default releases/simulate-<time>)")
    p.add_argument("--workdir", default=None, help="keep data, keys, ledgers and logs here (default: a temporary directory)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures to this JSON file")


def run_cli(args) -> int:
    import shutil

    out = Path(args.out or f"releases/simulate-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if out.exists():
        raise SystemExit(f"{out} already exists; choose a new --out")
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="ppsehr-simulate-"))
    say = lambda m: print(m, flush=True)  # noqa: E731
    ok = False
    try:
        figures = simulate(args.sites, args.rows, args.attributes, args.epsilon, workdir, out, args.heterogeneity,
                           args.seed, args.workers, say, site_variable=args.site_variable,
                           secure_aggregation=args.secure_aggregation,
                           formats=[f.strip() for f in args.formats.split(",") if f.strip()], report=args.report)
        ok = True
    finally:
        if not ok:
            print(f"simulation failed; logs are in {workdir / 'consortium' / 'logs'}", file=sys.stderr)
        elif not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    figures["command"] = "ppsehr simulate " + " ".join(sys.argv[2:])
    print(json.dumps(figures, indent=1))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(figures, indent=1) + "\n")
    return 0
