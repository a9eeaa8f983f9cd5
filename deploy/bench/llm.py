"""`ppsehr bench llm`: LLM-first generation on the demo consortium against an endpoint.

Fidelity (mean 1-/2-way TVD to the DP marginals) before and after calibration, tokens per
1,000 records, records per second. Without --llm-base-url a local fake server measures the
machinery, not a model.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ...common.dictionary import Dictionary
from ...server.llm.client import LLMClient, LLMConfig, LLMError
from ...server.llm.generate import calibrate, generate_pool, marginal_tvd
from ...server.llm.prompts import DPAggregates, SyntheticRecord
from ...server.model.graphical import Measurement

Progress = Callable[[str], None]


def demo_measurements(workdir: Path, epsilon: float = 4.0,
                      mappings: dict[str, Path] | None = None) -> tuple[Dictionary, list[Measurement]]:
    """DP marginals of the demo consortium the honest way: the four real site guards answer the
    release's signed one-round plan in this process (OpenDP noise, ledgers, receipts), the
    coordinator verifies and sums (`deploy.bench.fidelity.Federation`, `measure.rounds.collect`). `mappings`
    replaces a site's mapping file (tests plant values in a site table this way)."""
    from ...server.measure.aggregate import aggregate
    from .fidelity import Federation, demo_dataset

    ds = demo_dataset(mappings)
    first = Federation(ds, workdir).one_round(ds, epsilon)
    return ds.dictionary, aggregate(first.plan, first.results, ds.dictionary, correction=first.correction)


def bench_llm_first(config: LLMConfig, rows: int = 1000, styles: Sequence[str] = ("definition", "example", "rule"),
                    epsilon: float = 4.0, seed: int = 0, progress: Progress | None = None,
                    engine_iters: int = 1000) -> dict[str, Any]:
    """LLM-first generation on the demo consortium against config's endpoint: fidelity (mean 1-/2-way
    TVD to the DP marginals) before and after calibration, tokens per 1,000 records, records per second."""
    from ...server.model.graphical import estimate
    from ...server.model.records import decode

    say = progress or (lambda m: None)
    with tempfile.TemporaryDirectory(prefix="ppsehr-bench-llm-") as tmp:
        t0 = time.perf_counter()
        dictionary, measurements = demo_measurements(Path(tmp), epsilon)
        say(f"DP marginals from the 4 demo site guards (epsilon {epsilon:g} per site) in {time.perf_counter() - t0:.1f} s")
    aggregates = DPAggregates.from_measurements(dictionary, measurements)
    rng = np.random.default_rng(seed)
    model = estimate(dictionary.domain(), measurements, iters=engine_iters)
    samples = model.sample(rows, rng)
    engine = decode(samples, dictionary, rng)
    out: dict[str, Any] = {
        "endpoint": {"base_url_host": config.host, "model": config.model}, "rows": rows, "epsilon_per_site": epsilon,
        "batch_size": config.batch_size, "pool_factor": config.pool_factor, "seed": seed,
        "statistical_engine": {"tvd": marginal_tvd(dictionary, aggregates, samples)}, "styles": {}}
    client = LLMClient(config)
    examples = [SyntheticRecord.from_columns(dictionary, engine, i) for i in range(min(rows, 200))]
    t_start = time.monotonic()
    for k, style in enumerate(styles):
        if config.time_budget:  # each style its share of what is left
            client.set_deadline((config.time_budget - (time.monotonic() - t_start)) / (len(styles) - k))
        calls_before = len(client.calls)
        n_pool = int(math.ceil(rows * config.pool_factor))
        t1 = time.perf_counter()
        try:
            pool, stats = generate_pool(client, dictionary, aggregates, n_pool, style, examples, (), say)
        except Exception as e:  # never crash the bench: say why this style has no figures
            out["styles"][style] = {"records_requested": n_pool, "records_valid": 0, "valid_rate": 0.0,
                                    "why_not": f"{type(e).__name__}: {str(e)[:300]}"}
            say(f"{style}: no records ({out['styles'][style]['why_not']})")
            continue
        gen_s = time.perf_counter() - t1
        valid = stats["records_valid"]
        entry = {k: stats[k] for k in ("template", "records_requested", "records_valid", "valid_rate", "valid_of_returned",
                                       "records_returned", "records_rejected", "example_copies_dropped",
                                       "records_beyond_batch_size", "values_repaired", "rejections", "batches",
                                       "topup_batches", "batches_failed", "batches_not_sent", "batch_size", "replies_cut_off", "prompt_trimmed")}
        entry.update({k: stats[k] for k in ("reply_tokens_per_record", "batch_size_note") if k in stats})
        calls = client.calls[calls_before:]
        tokens = sum(c.prompt_tokens + c.completion_tokens for c in calls)
        entry.update(prompt_tokens=sum(c.prompt_tokens for c in calls), completion_tokens=sum(c.completion_tokens for c in calls),
                     tokens_per_1000_records=round(1000 * tokens / valid, 1) if valid else None,
                     records_per_second=round(valid / gen_s, 3) if gen_s > 0 else None, seconds=round(gen_s, 3),
                     cached_calls=sum(c.cached for c in calls))
        if valid < VALID_TARGET * n_pool:
            entry["why_not"] = stats.get("shortfall_reason") or "; ".join(stats["errors"][:2]) or "fewer valid records than requested"
            sp = client.memory.speed
            if "time budget" in entry["why_not"] and sp.known:
                entry["why_not"] += (f" (this style's share of --llm-time-budget {config.time_budget:g} s; the endpoint wrote "
                                     f"about {sp.completion_tps / sp.factor:.2g} tokens/s)")
        if stats["errors"]:
            entry["errors"] = stats["errors"][:3]
        if valid:
            _, cal = calibrate(dictionary, aggregates, pool, rows, rng)
            entry.update(tvd_before=cal["tvd_before"], tvd_after=cal["tvd_after"], calibration=cal["status"],
                         calibration_warnings=cal["warnings"],
                         effective_sample_size=cal["effective_sample_size"], distinct_records=cal["distinct_records"])
        out["styles"][style] = entry
        say(f"{style}: {valid} valid of {n_pool} requested ({100 * entry['valid_rate']:.0f}%), TVD 1-way "
            f"{entry.get('tvd_before', {}).get('1')} -> {entry.get('tvd_after', {}).get('1')}, 2-way "
            f"{entry.get('tvd_before', {}).get('2')} -> {entry.get('tvd_after', {}).get('2')}"
            + (f" ({entry['calibration']})" if entry.get("calibration") else "")
            + (f"; short: {entry['why_not'][:200]}" if entry.get("why_not") else ""))
    out["usage"] = client.usage()
    out["settings"] = {"time_budget_s": config.time_budget or None, "context": client.context or None, "batch_size": config.batch_size, "max_tokens": config.max_tokens,
                       "timeout": config.timeout if config.timeout is not None else "adaptive",
                       "concurrency": config.concurrency, "profile": config.profile or None}
    return out


VALID_TARGET = 0.8


def bench_markdown(result: dict[str, Any]) -> str:
    e = result["endpoint"]
    lines = ["# LLM-first generation on the demo consortium", "",
             f"Endpoint host `{e['base_url_host']}`, model `{e['model']}`; {result['rows']} output records, "
             f"epsilon {result['epsilon_per_site']:g} per site; batch {result['batch_size']}, pool factor {result['pool_factor']:g}.",
             "", "| style | valid / requested | 1-way TVD before -> after | 2-way TVD before -> after | calibration | "
             "tokens / 1,000 records | records / s |", "|---|---|---|---|---|---|---|"]
    notes = []
    for style, s in result["styles"].items():
        b, a = s.get("tvd_before", {}), s.get("tvd_after", {})
        lines.append(f"| {style} | {s['records_valid']} / {s['records_requested']} ({100 * (s.get('valid_rate') or 0):.0f}%) | "
                     f"{b.get('1')} -> {a.get('1')} | {b.get('2')} -> {a.get('2')} | {s.get('calibration', '-')} | "
                     f"{s.get('tokens_per_1000_records')} | {s.get('records_per_second')} |")
        if s.get("why_not"):
            notes.append(f"- {style}: below {100 * VALID_TARGET:.0f}% valid: {s['why_not']}")
        if s.get("example_copies_dropped"):
            notes.append(f"- {style}: {s['example_copies_dropped']} record(s) copied a prompt example and were dropped")
        for w in s.get("calibration_warnings", []):
            notes.append(f"- {style}: {w}")
    t = result["statistical_engine"]["tvd"]
    lines += ["", f"Statistical engine alone (same DP marginals, {result['rows']} records): 1-way TVD {t.get('1')}, "
              f"2-way TVD {t.get('2')}.", ""]
    if notes:
        lines += notes + [""]
    return "\n".join(lines)


def add_bench_arguments(p) -> None:
    from ...server.llm.client import add_llm_options

    add_llm_options(p)
    p.add_argument("--rows", type=int, default=1000, help="output records per prompt style (default 1000)")
    p.add_argument("--batch-size", type=int, default=None, help="records per LLM call (default: the endpoint profile's, "
                   "else 20; fewer if the context is small)")
    p.add_argument("--pool-factor", type=float, default=1.5, help="records generated per output record before calibration")
    p.add_argument("--epsilon", type=float, default=4.0, help="per-site budget of the DP marginals (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-llm", help="directory for bench-llm.json and bench-llm.md")
    p.add_argument("--engine-iters", type=int, default=1000, help="estimator iterations of the statistical-engine baseline")
    p.set_defaults(llm_styles="definition,example,rule", llm_cache="")


def run_bench_cli(args) -> int:
    """`ppsehr bench llm`: against --llm-base-url, or by default a local fake server started here."""
    from ...common.errors import PpsehrError
    from ...server.llm.client import llm_config_from_args

    fake = None
    if not args.llm_base_url:
        fake = _start_fake_server()
        args.llm_base_url, args.llm_model = fake.base_url, args.llm_model or "fake-model"
        print(f"no --llm-base-url: using the local fake OpenAI-compatible server at {fake.base_url} "
              "(measures the machinery, not a model)", flush=True)
    try:
        extra = {"batch_size": args.batch_size} if args.batch_size else {}
        cfg = llm_config_from_args(args, pool_factor=args.pool_factor, seed=args.seed, **extra)
        result = bench_llm_first(cfg, args.rows, cfg.styles, args.epsilon, args.seed, lambda m: print(m, flush=True),
                                 args.engine_iters)
    except LLMError as e:  # e.g. the endpoint is unusable: an error message, not a traceback
        raise PpsehrError(f"LLM benchmark failed: {e}") from None
    finally:
        if fake is not None:
            fake.stop()
    result["endpoint"]["fake_server"] = fake is not None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = bench_markdown(result)
    for name, data in (("bench-llm.json", json.dumps(result, indent=1) + "\n"), ("bench-llm.md", md)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(data)
        tmp.replace(out / name)
    print(md)
    print(f"written: {out / 'bench-llm.json'}, {out / 'bench-llm.md'}")
    return 0


def _start_fake_server():
    """The test suite's fake OpenAI-compatible server (tests/fake_openai_server.py of a source checkout)."""
    import importlib.util

    from ...common.errors import PpsehrError

    path = Path(__file__).resolve().parents[2] / "tests" / "fake_openai_server.py"
    if not path.exists():
        raise PpsehrError("the local fake server ships in the source tree's tests/; pass --llm-base-url and --llm-model")
    spec = importlib.util.spec_from_file_location("ppsehr_fake_openai_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeOpenAI().start()
