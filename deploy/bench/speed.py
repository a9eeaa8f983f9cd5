"""`ppsehr bench speed`: where the time goes, with the targets next to the figures.

- demo: `ppsehr demo`'s release on the loopback consortium (guards, SuperLink, SuperNodes, warm
  SuperExec), cold start to verified release, by phase: start-up (to the ServerApp's first event),
  identity + first round, later rounds, fit + sampling, release write (export, report, signing), verify.
- guard: one site guard answering a signed plan of K 2-way marginals over N rows (the guard's own
  `answer`: checks, OpenDP measurements, ledger debit, one-pass counting, noise, signing), with the
  counting and the noise also timed alone, and the peak memory the answer allocates.
- model: fit (the graphical model from a federated measurement) and sampling, by attributes and rows.
- simulation: `ppsehr simulate` wall time by sites (small runs here; large runs from
  `ppsehr simulate --json` files passed with --simulation-json).

Timings on a shared machine are noisy: each figure is the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np

TARGETS = {"demo_s": 15.0, "demo_secure_s": 20.0, "guard_1m_100_s": 0.5, "guard_10m_100_s": 5.0,
           "guard_10m_100_bytes": 2 * 1024**3}


# ----------------------------------------------------------------------------- demo phases
def demo_phases(workdir: Path, secure_aggregation: bool = False, epsilon: float = 4.0, seed: int = 1) -> dict:
    """One `ppsehr demo` release (its consortium, its defaults) timed by phase."""
    from ...server.release.bundle import verify_release
    from ..local import LocalConsortium

    events: list[tuple[float, dict]] = []
    t0 = time.monotonic()
    consortium = LocalConsortium(workdir, lifetime_epsilon=20.0)
    with consortium:
        started = time.monotonic()
        final = consortium.release(workdir / "release", epsilon=epsilon, seed=seed, secure_aggregation=secure_aggregation,
                                   on_event=lambda e: events.append((time.monotonic(), e)))
    verify_release(final["out"])
    end = time.monotonic()
    at = {}
    aggregates = [t for t, e in events if e.get("stage") == "aggregate"]
    for t, e in events:
        at.setdefault(e.get("stage"), t)
    fit = next((e for _, e in events if e.get("stage") == "synthesize"), {})
    phases = {"start-up": at["start"] - t0,
              "identity + first round": aggregates[0] - at["start"],
              "later rounds": (aggregates[-1] - aggregates[0]) if len(aggregates) > 1 else 0.0,
              "fit + sampling": at["synthesize"] - aggregates[-1],
              "release write": at["done"] - at["synthesize"],
              "stop + verify": end - at["done"]}
    return {"secure_aggregation": secure_aggregation, "total_s": round(end - t0, 2),
            "processes_started_s": round(started - t0, 2), "fit_message": fit.get("message", ""),
            "phases_s": {k: round(v, 2) for k, v in phases.items()}}


# ----------------------------------------------------------------------------- guard throughput
def _guard_fixture(work: Path, attributes: int):
    """A real SiteGuard (config, keys, ledger) over a simulated dictionary, and a plan signer."""
    from ...client.config import load_site_config
    from ...client.guard import SiteGuard
    from ...common.keys import init_consortium, load_signing_key
    from ...server.measure.planner import sign_plan
    from ..local import write_site_config
    from .fidelity import simulated_dataset

    ds = simulated_dataset(work / "data", 1, 1000, attributes, 0.0)
    site = next(iter(ds.mappings))
    keys = init_consortium(work / "keys", [site], ["127.0.0.1"])
    cfg = write_site_config(work / "site.toml", site, ds.dictionary_path, ds.mappings[site], work / "state", "127.0.0.1:0",
                            1e4, 1e-6, keys.site_keys[site][0], [keys.coordinator_pub],
                            {"max_rho_per_plan": 1e6, "max_marginals": 10_000, "max_cells": 10**7,
                             "max_total_cells": 2 * 10**7, "max_plans_per_day": 100_000})
    guard = SiteGuard(load_site_config(cfg))
    ckey = load_signing_key(keys.coordinator_key)

    def sign(plan):
        plan.expires_at = int(time.time() + 600)
        if not plan.addressees:
            plan.addressees.add(site=site, signer=guard.fingerprint)
        return sign_plan(plan, ckey)

    return ds.dictionary, guard, sign


def guard_throughput(rows_list: list[int], marginals_list: list[int], attributes: int = 30, repeat: int = 3,
                     say: Callable[[str], None] = print) -> list[dict]:
    from ...client.guard import compile_plan
    from ...common import cells
    from ...common.mapping import EncodedTable
    from ...protos import guard_pb2 as pb

    out = []
    with tempfile.TemporaryDirectory(prefix="ppsehr-speed-") as tmp:
        dictionary, guard, sign = _guard_fixture(Path(tmp), attributes)
        names = dictionary.names
        sizes = {n: dictionary[n].size for n in names}
        pairs = list(itertools.combinations(names, 2))
        np.random.default_rng(0).shuffle(pairs)
        for rows in rows_list:
            rng = np.random.default_rng(rows)
            unit = guard._table if rows == rows_list[0] else unit
            guard._table = EncodedTable({n: rng.integers(0, sizes[n], rows, dtype=np.int32) for n in names}, rows,
                                        unit.unit, unit.rows_per_patient)
            table_bytes = sum(c.nbytes for c in guard._table.columns.values())
            for k in marginals_list:
                chosen = pairs[:k]
                best = {"answer_s": math.inf, "answer_cpu_s": math.inf, "count_s": math.inf, "count_cpu_s": math.inf,
                        "noise_s": math.inf, "compile_s": math.inf}
                peak = 0
                for r in range(repeat + 1):  # the last run only measures memory (tracing slows it)
                    plan = pb.QueryPlan(plan_id=f"speed-{rows}-{k}-{r}-{time.monotonic_ns()}", coordinator="bench",
                                        purpose="speed", dictionary_hash=dictionary.hash,
                                        marginals=[pb.MarginalQuery(variables=list(v), rho=0.01) for v in chosen])
                    signed = sign(plan)
                    if r == repeat:
                        tracemalloc.start()
                        guard.answer(signed)
                        peak = tracemalloc.get_traced_memory()[1]
                        tracemalloc.stop()
                        break
                    t, c = time.perf_counter(), time.process_time()
                    guard.answer(signed)
                    best["answer_s"] = min(best["answer_s"], time.perf_counter() - t)
                    best["answer_cpu_s"] = min(best["answer_cpu_s"], time.process_time() - c)
                    t = time.perf_counter()
                    compiled = compile_plan(plan, dictionary, guard.config)
                    best["compile_s"] = min(best["compile_s"], time.perf_counter() - t)
                    t, cpu = time.perf_counter(), time.process_time()
                    exact = cells.count_tables(guard._table.columns, rows, [(c.variables, c.shape, c.groups) for c in compiled])
                    best["count_s"] = min(best["count_s"], time.perf_counter() - t)
                    best["count_cpu_s"] = min(best["count_cpu_s"], time.process_time() - cpu)
                    t = time.perf_counter()
                    for c, x in zip(compiled, exact):
                        c.measurement(x)
                    best["noise_s"] = min(best["noise_s"], time.perf_counter() - t)
                row = {"rows": rows, "marginals": k, "cells": int(sum(sizes[a] * sizes[b] for a, b in chosen)),
                       **{key: round(v, 4) for key, v in best.items()},
                       "table_bytes": int(table_bytes), "answer_peak_alloc_bytes": int(peak)}
                out.append(row)
                say(f"guard: {rows:>10,} rows, {k:>3} marginals ({row['cells']} cells): answer {row['answer_s']:.3f} s "
                    f"(count {row['count_s']:.3f}, noise {row['noise_s']:.3f}, compile {row['compile_s']:.3f}); "
                    f"table {table_bytes / 2**20:.0f} MiB + {peak / 2**20:.0f} MiB while answering")
    return out


def count_reference(rows: int = 1_000_000, marginals: int = 100, attributes: int = 30, repeat: int = 3) -> dict:
    """The counting before this change, for comparison: OpenDP's count_by_categories per marginal."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    rng = np.random.default_rng(1)
    sizes = [2] + list(rng.integers(2, 9, size=attributes - 1))
    cols = [rng.integers(0, s, rows, dtype=np.int32) for s in sizes]
    pairs = list(itertools.combinations(range(attributes), 2))[:marginals]
    space = dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.symmetric_distance()
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        for a, b in pairs:
            idx = np.ravel_multi_index([cols[a], cols[b]], (sizes[a], sizes[b])).astype(np.int64)
            (space >> dp.t.then_count_by_categories(categories=list(range(sizes[a] * sizes[b])), null_category=False,
                                                    MO=dp.L2Distance[int]))(idx)
        best = min(best, time.perf_counter() - t)
    return {"rows": rows, "marginals": marginals, "opendp_count_by_categories_s": round(best, 3)}


# ----------------------------------------------------------------------------- fit and sampling
def model_speed(attributes_list: list[int], rows_list: list[int], repeat: int = 1,
                say: Callable[[str], None] = print) -> list[dict]:
    from ...server.measure.rounds import round_measurements
    from ...server.model.synthesize import synthesize
    from .fidelity import Federation, simulated_dataset

    out = []
    for attributes in attributes_list:
        with tempfile.TemporaryDirectory(prefix="ppsehr-speed-") as tmp:
            ds = simulated_dataset(Path(tmp) / "data", 4, 100_000, attributes, 0.5)
            fed = Federation(ds, Path(tmp) / "fed")
            rounds, structure = fed.collect(ds, 1.0)
            measurements, groups = round_measurements(ds.dictionary, rounds, structure, "model", {})
            fit = math.inf
            for _ in range(repeat):
                syn = synthesize(ds.dictionary, measurements, groups, 1, np.random.default_rng(0))
                fit = min(fit, syn.seconds)
            for rows in rows_list:
                t = time.perf_counter()
                syn.model.sample(rows, np.random.default_rng(1))
                sample = time.perf_counter() - t
                out.append({"attributes": attributes, "rows": rows, "fit_s": round(fit, 3), "sample_s": round(sample, 3),
                            "cliques": len(syn.model.cliques)})
                say(f"model: {attributes} attributes: fit {fit:.2f} s; {rows:,} rows sampled in {sample:.2f} s")
    return out


# ----------------------------------------------------------------------------- simulation
def simulation_speed(sites_list: list[int], rows: int, attributes: int, say: Callable[[str], None] = print) -> list[dict]:
    from ..simulate import simulate

    out = []
    for sites in sites_list:
        with tempfile.TemporaryDirectory(prefix="ppsehr-speed-sim-") as tmp:
            f = simulate(sites, rows, attributes, 1.0, Path(tmp) / "work", Path(tmp) / "release", say=lambda m: None,
                         site_variable="model", formats=["csv"], report=False)
        f.pop("out", None)
        out.append(f)
        say(f"simulation: {sites} sites: {f['wall_s']:.1f} s wall, peak {f['peak_rss_bytes_flower'] / 2**30:.2f} GiB, "
            f"tvd2 {f['tvd2']:.4f}")
    return out


# ----------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    lines = [f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", ""]
    if result.get("demo"):
        lines += ["| demo | start-up | identity + first round | later rounds | fit + sampling | release write | stop + verify | total | target |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for d in result["demo"]:
            p = d["phases_s"]
            target = TARGETS["demo_secure_s" if d["secure_aggregation"] else "demo_s"]
            lines.append(f"| {'secure' if d['secure_aggregation'] else 'plain'} | {p['start-up']:.1f} | {p['identity + first round']:.1f} | "
                         f"{p['later rounds']:.1f} | {p['fit + sampling']:.1f} | {p['release write']:.1f} | {p['stop + verify']:.1f} | "
                         f"**{d['total_s']:.1f}** | {'<=' if d['total_s'] <= target else '>'} {target:g} s |")
        lines.append("")
    if result.get("guard"):
        lines += ["| guard: rows | marginals | cells | answer s | answer CPU s | count s | count CPU s | noise s | compile s "
                  "| table MiB | extra MiB | target |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for g in result["guard"]:
            target = ""
            if g["marginals"] == 100 and g["rows"] in (1_000_000, 10_000_000):
                limit = TARGETS["guard_1m_100_s" if g["rows"] == 1_000_000 else "guard_10m_100_s"]
                fits = g["rows"] != 10_000_000 or g["table_bytes"] + g["answer_peak_alloc_bytes"] <= TARGETS["guard_10m_100_bytes"]
                verdict = lambda x: "met" if x <= limit and fits else "missed"  # noqa: E731
                target = (f"<= {limit:g} s" + (" in 2 GiB" if g["rows"] == 10_000_000 else "")
                          + f": wall {verdict(g['answer_s'])}, CPU {verdict(g.get('answer_cpu_s', math.inf))}")
            lines.append(f"| {g['rows']:,} | {g['marginals']} | {g['cells']} | **{g['answer_s']:.3f}** | "
                         f"{g.get('answer_cpu_s', math.nan):.3f} | {g['count_s']:.3f} | {g.get('count_cpu_s', math.nan):.3f} | "
                         f"{g['noise_s']:.3f} | {g['compile_s']:.3f} | {g['table_bytes'] / 2**20:.0f} | "
                         f"{g['answer_peak_alloc_bytes'] / 2**20:.0f} | {target} |")
        if result.get("count_reference"):
            r = result["count_reference"]
            lines.append(f"\nBefore (OpenDP `count_by_categories` per marginal, {r['marginals']} 2-way marginals over "
                         f"{r['rows']:,} rows, counting only): {r['opendp_count_by_categories_s']:.2f} s.")
        lines.append("")
    if result.get("model"):
        lines += ["| model: attributes | rows sampled | fit s | sample s | cliques |", "|---|---|---|---|---|"]
        lines += [f"| {m['attributes']} | {m['rows']:,} | {m['fit_s']:.2f} | {m['sample_s']:.2f} | {m['cliques']} |"
                  for m in result["model"]]
        lines.append("")
    if result.get("simulation"):
        lines += ["| simulation: sites | rows | attributes | workers | wall s | peak RSS GiB (Flower + Ray) | tvd2 |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {s['sites']} | {s['rows']:,} | {s['attributes']} | {s['workers']} | {s['wall_s']:.0f} | "
                  f"{s['peak_rss_bytes_flower'] / 2**30:.2f} | {s['tvd2']:.4f} |" for s in result["simulation"]]
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default="demo,guard,model,simulation",
                   help="comma-separated, from demo,guard,model,simulation (default all)")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is reported (default 3)")
    p.add_argument("--demo-runs", type=int, default=1, help="demo releases per variant (plain, secure); best reported")
    p.add_argument("--guard-rows", default="1e5,1e6,1e7")
    p.add_argument("--guard-marginals", default="10,100")
    p.add_argument("--model-attributes", default="10,30")
    p.add_argument("--model-rows", default="1e5,1e6")
    p.add_argument("--simulate-sites", default="10", help="small simulations run here (comma-separated sites)")
    p.add_argument("--simulate-rows", type=int, default=100_000)
    p.add_argument("--simulation-json", nargs="*", default=[], help="`ppsehr simulate --json` results to include")
    p.add_argument("--json", dest="json_out", default="bench-results/speed.json")
    p.add_argument("--out", default="bench-results", help="directory for the markdown table")


def run_speed_cli(args) -> int:
    import os
    import platform

    say = lambda m: print(m, flush=True)  # noqa: E731
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    result: dict = {"command": "ppsehr bench speed " + " ".join(sys.argv[3:]),
                    "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}, load average "
                               f"{os.getloadavg()[0]:.1f} at start (shared machine: figures are best-of runs)",
                    "targets": TARGETS}
    if "guard" in parts:
        result["guard"] = guard_throughput(_ints(args.guard_rows), _ints(args.guard_marginals), repeat=args.repeat, say=say)
        result["count_reference"] = count_reference(repeat=args.repeat)
    if "model" in parts:
        result["model"] = model_speed(_ints(args.model_attributes), _ints(args.model_rows), say=say)
    if "demo" in parts:
        result["demo"] = []
        for secure in (False, True):
            runs = []
            for _ in range(max(1, args.demo_runs)):
                with tempfile.TemporaryDirectory(prefix="ppsehr-speed-demo-") as tmp:
                    runs.append(demo_phases(Path(tmp), secure_aggregation=secure))
                say(f"demo ({'secure' if secure else 'plain'}): {runs[-1]['total_s']:.1f} s {runs[-1]['phases_s']}")
            result["demo"].append(min(runs, key=lambda r: r["total_s"]))
    if "simulation" in parts:
        result["simulation"] = simulation_speed(_ints(args.simulate_sites), args.simulate_rows, 30, say=say)
    for path in args.simulation_json:
        result.setdefault("simulation", []).append(json.loads(Path(path).read_text()))
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    (out / f"{Path(args.json_out).stem}.md").write_text(md)
    print(md)
    print(f"wrote {args.json_out} and {out / (Path(args.json_out).stem + '.md')}")
    return 0
