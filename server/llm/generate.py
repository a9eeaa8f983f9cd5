"""LLM-first generation (LLMSYN/SynLLM style), calibrated back to the DP marginals.

Records come in batches with a prompt style (definition, example or rule). Every record is
validated against the dictionary: out-of-domain values are repaired when unambiguous (case,
spacing, the dictionary's out-of-range policy) and the record is rejected otherwise. The pool is
then calibrated to the DP marginals (raking, then systematic importance resampling), so the
LLM's distribution errors do not reach the release.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from ...common.dictionary import OUT_OF_RANGE, Dictionary
from ..model.records import encode
from .client import LLMClient, LLMError
from .knowledge import match_category, norm_label
from .prompts import STYLES, TEMPLATES, DPAggregates, Rule, SyntheticRecord, generation_prompt

Progress = Callable[[str], None]


def marginal_tvd(dictionary: Dictionary, aggregates: DPAggregates, cells: np.ndarray,
                 weights: np.ndarray | None = None) -> dict[str, Any]:
    """Mean total variation distance, by marginal width, between (weighted) records and the DP marginals."""
    index = {n: j for j, n in enumerate(dictionary.names)}
    w = np.ones(len(cells)) if weights is None else np.asarray(weights, float)
    w = w / w.sum() if w.sum() > 0 else w
    by_width: dict[int, list[float]] = {}
    for m in aggregates.marginals:
        flat = np.ravel_multi_index([cells[:, index[v]] for v in m.variables], m.shape)
        synth = np.bincount(flat, weights=w, minlength=int(np.prod(m.shape)))
        by_width.setdefault(len(m.variables), []).append(float(0.5 * np.abs(synth - m.probabilities().ravel()).sum()))
    return {str(k): round(float(np.mean(v)), 5) for k, v in sorted(by_width.items())}


def validate_record(dictionary: Dictionary, raw: Any) -> tuple[dict[str, str] | None, int, str]:
    """An LLM-written record in the dictionary's vocabulary, the number of values repaired, and why it
    was rejected (if it was). Repairs: category spelling, unknown -> missing where allowed, numbers
    rounded to the precision, out-of-range numbers by the dictionary's policy (clip / missing / cell)."""
    if not isinstance(raw, dict):
        return None, 0, "not an object"
    out, fixes = {}, 0
    for name, var in dictionary.variables.items():
        v = raw.get(name)
        if v is None or (isinstance(v, str) and norm_label(v) in ("", "unknown", "missing", "n/a", "na", "none", "null")):
            if not var.missing:
                return None, fixes, f"{name} is missing but the dictionary does not allow it"
            fixes += v not in (None, "")
            out[name] = ""
            continue
        if var.type == "categorical":
            m = match_category(var, v)
            if m is None:
                return None, fixes, f"{name} = {str(v)[:40]!r} is not in the domain"
            fixes += m != v
            out[name] = m
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            return None, fixes, f"{name} = {str(v)[:40]!r} is not a number"
        if isinstance(v, bool) or not math.isfinite(x):
            return None, fixes, f"{name} = {v!r} is not a number"
        lo, hi = var.bins[0], var.bins[-1]
        if not lo <= x <= hi:
            if x < lo - (hi - lo) or x > hi + (hi - lo):
                return None, fixes, f"{name} = {x:g} is far outside [{lo:g}, {hi:g}]"
            fixes += 1
            if var.out_of_range == "clip":
                x = min(max(x, lo), hi)
            else:
                out[name] = "" if var.out_of_range == "missing" else OUT_OF_RANGE
                continue
        s = f"{round(x, var.precision):.{var.precision}f}"
        if float(s) > hi or float(s) < lo:
            s = f"{(hi if float(s) > hi else lo):.{var.precision}f}"
        out[name] = s
    return out, fixes, ""


def _records_shape(obj: Any) -> None:
    if not isinstance(obj, dict) or not isinstance(obj.get("records"), list) or not obj["records"]:
        raise ValueError('expected an object {"records": [ ... ]} with at least one record')
    if not all(isinstance(r, dict) for r in obj["records"]):
        raise ValueError("every record must be a JSON object")


def generate_pool(client: LLMClient, dictionary: Dictionary, aggregates: DPAggregates, n: int, style: str,
                  examples: Sequence[SyntheticRecord] = (), rules: Sequence[Rule] = (),
                  progress: Progress | None = None) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """About n validated LLM-written records (columns) and what it took."""
    bs = client.config.batch_size
    k = max(1, client.config.example_rows)
    prompts = []
    for b in range(math.ceil(n / bs)):
        ex = [examples[(b * k + j) % len(examples)] for j in range(min(k, len(examples)))] if style == "example" else ()
        prompts.append(generation_prompt(style, dictionary, aggregates, min(bs, n - b * bs), b, ex, rules))
    t0 = time.perf_counter()
    calls_before = len(client.calls)

    def one(p):
        try:
            return client.json(p, validate=_records_shape)[0], ""
        except LLMError as e:
            return None, str(e)

    results = client.map(one, prompts)
    seconds = time.perf_counter() - t0
    cols: dict[str, list[str]] = {name: [] for name in dictionary.names}
    stats = {"style": style, "template": TEMPLATES[STYLES[style]].id, "batches": len(prompts), "batches_failed": 0,
             "records_returned": 0, "records_valid": 0, "records_rejected": 0, "values_repaired": 0,
             "rejections": {}, "errors": []}
    for obj, err in results:
        if obj is None:
            stats["batches_failed"] += 1
            stats["errors"].append(err[:200])
            continue
        for raw in obj["records"]:
            stats["records_returned"] += 1
            rec, fixes, why = validate_record(dictionary, raw)
            stats["values_repaired"] += fixes
            if rec is None:
                stats["records_rejected"] += 1
                key = why.split(" ")[0]
                stats["rejections"][key] = stats["rejections"].get(key, 0) + 1
                continue
            stats["records_valid"] += 1
            for name in dictionary.names:
                cols[name].append(rec[name])
    new_calls = client.calls[calls_before:]
    stats["generation_seconds"] = round(seconds, 3)
    stats["prompt_tokens"] = sum(c.prompt_tokens for c in new_calls)
    stats["completion_tokens"] = sum(c.completion_tokens for c in new_calls)
    stats["errors"] = stats["errors"][:5]
    if progress:
        progress(f"LLM {style}-style generation: {stats['records_valid']} valid of {stats['records_returned']} records "
                 f"in {len(prompts)} batches ({stats['values_repaired']} values repaired, {stats['records_rejected']} rejected)")
    return cols, stats


def rake(dictionary: Dictionary, aggregates: DPAggregates, cells: np.ndarray, iters: int = 200, tol: float = 1e-6,
         max_weight: float = 30.0) -> np.ndarray:
    """Raking (iterative proportional fitting) of record weights to every DP marginal; weights capped
    at max_weight times the mean so a few records cannot carry the release. Returns normalised weights."""
    n = len(cells)
    index = {v: j for j, v in enumerate(dictionary.names)}
    targets = []
    for m in sorted(aggregates.marginals, key=lambda m: -len(m.variables)):  # 1-way margins last: matched best
        flat = np.ravel_multi_index([cells[:, index[v]] for v in m.variables], m.shape)
        targets.append((flat, m.probabilities().ravel()))
    w = np.full(n, 1.0 / n)
    for _ in range(iters):
        prev = w.copy()
        for flat, target in targets:
            current = np.bincount(flat, weights=w, minlength=target.size)
            covered = target * (current > 0)
            scale = covered.sum()
            ratio = np.where(current > 0, covered / np.where(current > 0, current, 1) / (scale if scale > 0 else 1), 0)
            w = w * ratio[flat]
            w = np.minimum(w / w.sum(), max_weight / n)
            w /= w.sum()
        if np.abs(w - prev).sum() < tol:
            break
    return w


def resample(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Systematic resampling: n indices, index i drawn about n * w_i times, in random order."""
    c = np.cumsum(weights)
    c[-1] = 1.0
    positions = (rng.random() + np.arange(n)) / n
    idx = np.searchsorted(c, positions, side="right")
    return rng.permutation(np.minimum(idx, len(weights) - 1))


def calibrate(dictionary: Dictionary, aggregates: DPAggregates, pool: dict[str, list[str]], n: int,
              rng: np.random.Generator) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """n records resampled from the pool with raking weights; TVD to the DP marginals before and after."""
    cells = encode(dictionary, pool)
    before = marginal_tvd(dictionary, aggregates, cells)
    w = rake(dictionary, aggregates, cells)
    idx = resample(w, n, rng)
    out = {name: [pool[name][i] for i in idx] for name in dictionary.names}
    after = marginal_tvd(dictionary, aggregates, cells[idx])
    ess = float(1.0 / np.sum(w ** 2))
    return out, {"pool": len(cells), "rows": n, "tvd_before": before, "tvd_weighted": marginal_tvd(dictionary, aggregates, cells, w),
                 "tvd_after": after, "effective_sample_size": round(ess, 1), "distinct_records": int(len(np.unique(idx)))}


