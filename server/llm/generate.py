"""LLM-first generation (LLMSYN/SynLLM style), calibrated back to the DP marginals.

Records come in batches with a prompt style (definition, example or rule), sized to the
endpoint's context; short batches are topped up. Every record is validated against the
dictionary: out-of-domain values are repaired when unambiguous (case, spacing, the dictionary's
out-of-range policy) and the record is rejected otherwise; a record that copies an example shown
in the prompt is dropped. The pool is then calibrated to the DP marginals (raking, then systematic
importance resampling), so the LLM's distribution errors do not reach the release; a pool too
small to calibrate is said to be so, not calibrated.
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from ...common.dictionary import OUT_OF_RANGE, Dictionary
from ..model.records import encode
from .client import LLMClient, LLMContextError, LLMError, LLMTimeBudgetError
from .knowledge import match_category, norm_label
from .prompts import (STYLES, TEMPLATES, DPAggregates, Prompt, PromptTooLong, Rule, SyntheticRecord, _typed,
                      generation_prompt)

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


def _record_tokens(client: LLMClient, dictionary: Dictionary, examples: Sequence[SyntheticRecord]) -> float:
    """Tokens one record of a reply takes, with room for the whitespace models add (pretty-printing)."""
    if examples:
        text = max((json.dumps(_typed(dictionary, r.as_dict())) for r in examples[:20]), key=len)
    else:
        text = json.dumps({n: (round(v.bins[-1], v.precision) if v.type == "numeric" else max(v.categories, key=len))
                           for n, v in dictionary.variables.items()})
    return 1.5 * client.tokens(text) + 4


class _Batches:
    """Prompts of one style sized to the endpoint: records per batch, prompt budget and max_tokens."""

    def __init__(self, client: LLMClient, dictionary: Dictionary, aggregates: DPAggregates, style: str,
                 examples: Sequence[SyntheticRecord], rules: Sequence[Rule]):
        self.client, self.dictionary, self.aggregates, self.style = client, dictionary, aggregates, style
        self.examples, self.rules = examples, rules
        self.estimate = _record_tokens(client, dictionary, examples)  # from the dictionary, before any reply
        self.size = max(1, client.config.batch_size)
        self.dropped: dict[str, int] = {}
        self.compact = False
        self.seen_tokens = self.seen_records = 0
        self.fit_capped = False  # the batch size was cut so that a reply fits max_tokens
        self._fit()

    def _fit(self) -> None:
        fit = self.fits()
        if fit < self.size:  # a batch must fit one reply: more records than max_tokens holds come back cut off
            self.size, self.fit_capped = fit, True

    @property
    def per_record(self) -> float:
        """Reply tokens to allow per record: the estimate, or 1.3 times what this endpoint's replies took
        if that is more (a model's whitespace and digits vary; a cap costs nothing unless the model loops)."""
        seen = self.seen_tokens / self.seen_records if self.seen_records else 0.0
        return max(self.estimate, 1.3 * seen)

    def reply_tokens(self, n: int) -> int:
        return int(self.per_record * n) + 40

    def max_tokens(self, n: int) -> int:
        return min(self.client.config.max_tokens, self.reply_tokens(n) + 32)

    def fits(self) -> int:
        """Records whose reply fits the max_tokens cap (and half the context, when known)."""
        cap = self.client.config.max_tokens
        if self.client.context:
            cap = min(cap, self.client.context // 2)
        return max(1, int((cap - 72) // self.per_record))

    def learn(self, completion_tokens: int, records: int) -> None:
        """Tokens the records of a reply took: the next batches are sized to it (see per_record)."""
        if completion_tokens > 0 and records > 0:
            self.seen_tokens += completion_tokens
            self.seen_records += records

    def build(self, n: int, batch: int) -> tuple[Prompt, int]:
        """(the prompt for a batch of up to n records, its max_tokens); fewer records if the context is small.
        LLMContextError if not even one record fits."""
        c = self.client
        k = max(1, c.config.example_rows)
        ex = ([self.examples[(batch * k + j) % len(self.examples)] for j in range(min(k, len(self.examples)))]
              if self.style == "example" else ())
        self._fit()  # again: the context or the tokens a record takes may be known better now
        n = max(1, min(n, self.size))
        afford = c.affordable_tokens(c.context // 3 if c.context else 1500)
        if afford is not None:  # no more records than the endpoint can write in the time left
            n = max(1, min(n, int((afford - 40) // self.per_record)))
        while True:
            budget = None
            if c.context:
                system = c.message_tokens(generation_prompt(self.style, self.dictionary, self.aggregates, n, batch, ex[:1],
                                                            self.rules, None, c.tokens).chat_messages(True)[:1])
                budget = c.context - system - self.max_tokens(n) - 48
            try:
                p = generation_prompt(self.style, self.dictionary, self.aggregates, n, batch, ex, self.rules, budget, c.tokens)
            except PromptTooLong as e:
                if n == 1:
                    raise LLMContextError(f"{TEMPLATES[STYLES[self.style]].id}: even a batch of one record does not fit the "
                                          f"endpoint's context of {c.context} tokens ({e}); not sent", c.context, e.needed) from None
                n = max(1, n - max(1, n // 4))
                self.size = n
                continue
            for key, count in p.info.get("dropped", ()):
                self.dropped[key] = max(self.dropped.get(key, 0), count)
            self.compact = self.compact or bool(p.info.get("compact_dictionary"))
            return p, self.max_tokens(n)


def generate_pool(client: LLMClient, dictionary: Dictionary, aggregates: DPAggregates, n: int, style: str,
                  examples: Sequence[SyntheticRecord] = (), rules: Sequence[Rule] = (),
                  progress: Progress | None = None) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """n validated LLM-written records (columns; fewer if the endpoint cannot deliver them) and what it took.

    Batches are sized to the endpoint's context. A batch that comes back short (rejected records,
    a reply cut off at max_tokens) is made up by extra calls, at most max(topup_calls, half the
    first round's calls); a batch that comes back long is cut to its size. Records that copy an
    example shown in a prompt are dropped and counted."""
    batches = _Batches(client, dictionary, aggregates, style, examples, rules)
    t0 = time.perf_counter()
    calls_before = len(client.calls)
    cols: dict[str, list[str]] = {name: [] for name in dictionary.names}
    stats: dict[str, Any] = {
        "style": style, "template": TEMPLATES[STYLES[style]].id, "records_requested": n, "batches": 0,
        "batches_failed": 0, "batches_not_sent": 0, "topup_batches": 0, "records_returned": 0, "records_valid": 0, "records_rejected": 0,
        "records_beyond_batch_size": 0, "example_copies_dropped": 0, "values_repaired": 0, "rejections": {},
        "errors": []}
    shown: set[tuple[str, ...]] = set()

    counter = iter(range(10 ** 9))
    lock = threading.Lock()

    def next_batch() -> int:
        with lock:
            return next(counter)

    def one(size: int) -> list[tuple[Any, str, Prompt | None, int]]:
        """Calls for `size` records: one, or several if the batch size has to shrink to fit the context."""
        out: list[tuple[Any, str, Prompt | None, int]] = []
        asked = overflows = 0
        while asked < size:
            try:
                prompt, max_tokens = batches.build(size - asked, next_batch())
            except LLMContextError as e:
                out.append((None, str(e), None, size - asked))
                break
            want = prompt.info.get("n", size - asked)
            try:
                obj, rec = client.json(prompt, validate=_records_shape, max_tokens=max_tokens)
            except LLMContextError as e:  # the context is smaller than thought: it is known now; build again
                overflows += 1
                if overflows > 1 or not (client.context or batches.size > 1):
                    out.append((None, str(e), prompt, size - asked))
                    break
                if not client.context:
                    batches.size = max(1, batches.size // 2)
                continue
            except LLMTimeBudgetError as e:  # nothing was sent (or a timed-out request was not sent again)
                out.append((None, str(e), None if "not sent" in str(e) else prompt, want))
                break
            except LLMError as e:
                out.append((None, str(e), prompt, want))
                break
            if not rec.cached:
                with lock:
                    batches.learn(rec.completion_tokens, len(obj["records"]))
            out.append((obj, "", prompt, want))
            asked += want
        return out

    def take(results) -> int:
        calls = 0
        for obj, err, prompt, size in (r for job in results for r in job):
            calls += prompt is not None
            if prompt is not None and style == "example":
                for line in prompt.info.get("examples_shown", ()):
                    rec, _, _ = validate_record(dictionary, json.loads(line))
                    if rec is not None:
                        shown.add(tuple(rec[name] for name in dictionary.names))
            if obj is None and prompt is None and "time budget" in err:  # not sent: no call, no failure
                stats["batches_not_sent"] += 1
                if not any("time budget" in e for e in stats["errors"]):
                    stats["errors"].append(err[:200])
                continue
            if obj is None:
                stats["batches_failed"] += 1
                stats["errors"].append(err[:200])
                continue
            kept = 0
            for raw in obj["records"]:
                stats["records_returned"] += 1
                rec, fixes, why = validate_record(dictionary, raw)
                stats["values_repaired"] += fixes
                if rec is None:
                    stats["records_rejected"] += 1
                    key = why.split(" ")[0]
                    stats["rejections"][key] = stats["rejections"].get(key, 0) + 1
                    continue
                if tuple(rec[name] for name in dictionary.names) in shown:
                    stats["example_copies_dropped"] += 1
                    continue
                if kept >= size or len(cols[dictionary.names[0]]) >= n:
                    stats["records_beyond_batch_size"] += 1
                    continue
                kept += 1
                for name in dictionary.names:
                    cols[name].append(rec[name])
        return calls

    def jobs(count: int) -> list[int]:
        size = batches.size
        return [min(size, count - i * size) for i in range(math.ceil(count / size))]

    stats["batches"] = take(client.map(one, jobs(n)))
    extra_limit = max(client.config.topup_calls, math.ceil(stats["batches"] / 2)) if client.config.topup_calls else 0
    stopped = ""
    while len(cols[dictionary.names[0]]) < n and stats["topup_batches"] < extra_limit:
        if any("time budget" in e for e in stats["errors"]):
            stopped = "the LLM time budget is spent"
            break
        if stats["records_returned"] == 0 and stats["batches_failed"] >= stats["batches"] + stats["topup_batches"]:
            stopped = "every batch failed: " + (stats["errors"][0] if stats["errors"] else "")
            break
        short = n - len(cols[dictionary.names[0]])
        more = jobs(short)[:extra_limit - stats["topup_batches"]]
        made = take(client.map(one, more))
        stats["topup_batches"] += max(made, 1)
    valid = len(cols[dictionary.names[0]])
    stats["records_valid"] = valid
    stats["valid_rate"] = round(valid / n, 3) if n else None
    stats["valid_of_returned"] = round(valid / stats["records_returned"], 3) if stats["records_returned"] else None
    if valid < n:
        stats["shortfall_reason"] = stopped or (
            f"{n - valid} record(s) short after {stats['topup_batches']} extra call(s): " + "; ".join(
                [f"{stats['records_rejected']} rejected ({', '.join(f'{k}: {v}' for k, v in stats['rejections'].items())})"]
                * bool(stats["records_rejected"])
                + [f"{stats['example_copies_dropped']} copied an example"] * bool(stats["example_copies_dropped"])
                + [f"{stats['batches_failed']} call(s) failed: {stats['errors'][0] if stats['errors'] else ''}"]
                * bool(stats["batches_failed"])))
    new_calls = client.calls[calls_before:]
    stats["batch_size"] = batches.size
    if batches.seen_records:
        stats["reply_tokens_per_record"] = round(batches.seen_tokens / batches.seen_records, 1)
    if batches.fit_capped:
        stats["batch_size_note"] = (f"batches cut to {batches.size} records so that a reply fits max_tokens "
                                    f"{client.config.max_tokens} (about {batches.per_record:.0f} tokens a record)")
    stats["prompt_trimmed"] = dict(batches.dropped)
    if batches.compact:
        stats["prompt_trimmed"]["dictionary"] = "shortened descriptions"
    stats["replies_cut_off"] = sum(c.truncated > 0 for c in new_calls)
    stats["generation_seconds"] = round(time.perf_counter() - t0, 3)
    stats["prompt_tokens"] = sum(c.prompt_tokens for c in new_calls)
    stats["completion_tokens"] = sum(c.completion_tokens for c in new_calls)
    stats["errors"] = stats["errors"][:5]
    if progress:
        progress(f"LLM {style}-style generation: {valid} valid of {n} requested ({stats['records_returned']} returned in "
                 f"{stats['batches'] + stats['topup_batches']} batches of up to {batches.size}; {stats['values_repaired']} "
                 f"values repaired, {stats['records_rejected']} rejected, {stats['example_copies_dropped']} example copies dropped)")
    return cols, stats


def rake(dictionary: Dictionary, aggregates: DPAggregates, cells: np.ndarray, iters: int = 200, tol: float = 1e-6,
         max_weight: float = 30.0) -> np.ndarray:
    """Raking (iterative proportional fitting) of record weights to every DP marginal; weights capped
    at max_weight times the mean so a few records cannot carry the release. Returns normalised weights
    (never NaN: a step that would zero every weight is not taken)."""
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
            if scale <= 0:
                continue
            ratio = np.where(current > 0, covered / np.where(current > 0, current, 1) / scale, 0)
            new = w * ratio[flat]
            if not np.isfinite(new).all() or new.sum() <= 0:
                continue
            new = np.minimum(new / new.sum(), max_weight / n)
            w = new / new.sum()
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


MIN_POOL = 50  # fewer records than this cannot be calibrated to the DP marginals in any useful way
MIN_ESS = 20.0  # nor can weights this concentrated


def calibrate(dictionary: Dictionary, aggregates: DPAggregates, pool: dict[str, list[str]], n: int,
              rng: np.random.Generator, min_pool: int = MIN_POOL, min_ess: float = MIN_ESS) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """n records resampled from the pool with raking weights; TVD to the DP marginals before and after.

    Calibration is refused (records resampled uniformly from the pool, with a warning) when the pool
    is smaller than min_pool, when the raking weights' effective sample size is below min_ess, or
    when the calibrated records end up further from the DP marginals than the pool itself."""
    cells = encode(dictionary, pool)
    m = len(cells)
    before = marginal_tvd(dictionary, aggregates, cells)
    uniform = np.full(m, 1.0 / m)
    warnings: list[str] = []
    status, w = "calibrated", uniform
    if m < min_pool:
        status = "refused"
        warnings.append(f"the pool of {m} LLM-written records is too small to calibrate to the DP marginals (fewer than "
                        f"{min_pool}); records resampled uniformly, so the LLM's distribution errors remain")
    else:
        w = rake(dictionary, aggregates, cells)
        ess = 1.0 / float(np.sum(w ** 2)) if np.isfinite(w).all() and w.sum() > 0 else 0.0
        if ess < min_ess:
            status, w = "refused", uniform
            warnings.append(f"the calibration weights' effective sample size is {ess:.1f} (below {min_ess:g}): the pool "
                            "does not cover the DP marginals; records resampled uniformly")
    idx = resample(w, n, rng)
    after = marginal_tvd(dictionary, aggregates, cells[idx])
    if status == "calibrated" and after.get("1", 0) > before.get("1", 0):
        worse = after.get("1")
        status, w = "refused", uniform
        idx = resample(w, n, rng)
        after = marginal_tvd(dictionary, aggregates, cells[idx])
        warnings.append(f"calibration moved the records away from the DP marginals (1-way TVD {before.get('1')} -> {worse}); "
                        "records resampled uniformly instead")
    if m < n / 2:
        warnings.append(f"the pool ({m} records) is less than half the output ({n}); records repeat about {n / m:.1f} times")
    ess = 1.0 / float(np.sum(w ** 2))
    out = {name: [pool[name][i] for i in idx] for name in dictionary.names}
    return out, {"status": status, "pool": m, "rows": n, "tvd_before": before,
                 "tvd_weighted": marginal_tvd(dictionary, aggregates, cells, w), "tvd_after": after,
                 "effective_sample_size": round(ess, 1), "distinct_records": int(len(np.unique(idx))),
                 "warnings": warnings}
