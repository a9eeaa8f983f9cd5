"""The LLM stage of a release: clinical knowledge, LLM-first generation and notes, from public inputs only.

Uses (each optional, each recorded in the manifest with model, template versions and prompt hashes):

- knowledge: from the dictionary alone (zero privacy budget) the LLM proposes clinically
  important dependencies (the planner can measure them: `knowledge_dependencies`) and
  impossible value combinations. Rules are validated against the dictionary, checked against
  the DP aggregates where a measured marginal covers them (a rule that DP data contradicts is
  rejected), stored in llm_rules.json, and used to repair sampled records.
- generate: LLM-first generation (LLMSYN/SynLLM style) in batches with a prompt style
  (definition, example or rule). Every record is validated against the dictionary:
  out-of-domain values are repaired when unambiguous (case, spacing, the dictionary's
  out-of-range policy) and the record is rejected otherwise. The pool is then calibrated back
  to the DP marginals (raking, then systematic importance resampling), so the LLM's
  distribution errors do not reach the release.
- notes: one short note per synthetic record, conditioned only on that record, in the chosen
  language, passed through the PII guard.

Everything here is post-processing of DP outputs and costs no privacy budget. With no endpoint
configured nothing is called and the release says the statistical engine alone was used.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..common.dictionary import MISSING, OTHER, OUT_OF_RANGE, Dictionary, Variable
from .llm import LLMClient, LLMConfig, LLMError, api_key
from .model import JunctionTree, Measurement
from .pii import PIIGuard, text_max_tier
from .prompts import (STYLES, TEMPLATES, Condition, DPAggregates, Rule, SyntheticRecord, generation_prompt,
                      knowledge_prompt, note_prompt)
from .records import to_csv

__all__ = ["LLMConfig", "LLMStageResult", "run_llm_stage", "knowledge_dependencies", "Knowledge"]

Progress = Callable[[str], None]
OFFLINE_REASON = "no LLM endpoint configured; records come from the statistical engine alone"
MAX_RULE_MASS = 0.03  # an "impossible" combination holding this share of the DP records is contradicted by data


@dataclass
class LLMStageResult:
    files: dict[str, bytes]
    columns: dict[str, list[str]]
    manifest_section: dict[str, Any]
    dependencies: list[tuple[str, ...]] = field(default_factory=list)


@dataclass
class Knowledge:
    dependencies: list[tuple[str, ...]]
    rules: list[Rule]
    report: dict[str, Any]


# ----------------------------------------------------------------------------- values and cells
def cell_of(var: Variable, value: str) -> int:
    """Cell index of an in-domain record value."""
    if value == "":
        return var.cell_index(MISSING)
    if var.type == "categorical" or value == OUT_OF_RANGE:
        return var.cell_index(value)
    x = float(value)
    i = int(np.searchsorted(var.bins, x, side="right")) - 1
    return min(max(i, 0), var.n_bins - 1)


def encode(dictionary: Dictionary, columns: dict[str, Sequence[str]]) -> np.ndarray:
    """(n, V) cell indices of records given as string columns (dictionary order)."""
    n = len(next(iter(columns.values()))) if columns else 0
    out = np.zeros((n, len(dictionary.names)), dtype=np.int64)
    for j, (name, var) in enumerate(dictionary.variables.items()):
        cache: dict[str, int] = {}
        col = columns[name]
        for i in range(n):
            v = col[i]
            if v not in cache:
                cache[v] = cell_of(var, v)
            out[i, j] = cache[v]
    return out


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


# ----------------------------------------------------------------------------- knowledge
def _norm(s: str) -> str:
    return re.sub(r"[\s\-/]+", "_", str(s).strip().lower())


def _match_category(var: Variable, value: Any) -> str | None:
    """A category of var for an LLM-written value: exact, or equal after case/space/hyphen normalisation."""
    if isinstance(value, bool):
        value = "yes" if value else "no"
    s = str(value)
    cats = list(var.categories) + ([OTHER] if var.other else [])
    if s in cats:
        return s
    by_norm = {_norm(c): c for c in cats}
    return by_norm.get(_norm(s))


def parse_rules(dictionary: Dictionary, raw: list[dict]) -> tuple[list[Rule], list[dict]]:
    """Rules that make sense for the dictionary, and the rejected ones with the reason."""
    rules, rejected, seen = [], [], set()
    for i, r in enumerate(raw):
        try:
            conds = []
            for c in r.get("conditions") or []:
                name, op = c.get("variable"), c.get("op")
                if name not in dictionary.variables:
                    raise ValueError(f"unknown variable {name!r}")
                var = dictionary[name]
                if op in ("in", "not_in"):
                    if var.type != "categorical":
                        raise ValueError(f"{op} on numeric variable {name}; use a comparison")
                    vals = []
                    for v in c.get("values") or []:
                        m = _match_category(var, v)
                        if m is None:
                            raise ValueError(f"{name} has no category {v!r}")
                        vals.append(m)
                    if not vals:
                        raise ValueError(f"{op} with no values")
                    conds.append(Condition(name, op, tuple(dict.fromkeys(vals))))
                elif op in ("<", "<=", ">", ">="):
                    if var.type != "numeric":
                        raise ValueError(f"comparison on categorical variable {name}")
                    x = c.get("value")
                    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                        raise ValueError(f"comparison on {name} needs a finite number")
                    conds.append(Condition(name, op, (), float(x)))
                else:
                    raise ValueError(f"unknown operator {op!r}")
            if not conds:
                raise ValueError("no conditions")
            repair = r.get("repair")
            if repair not in {c.variable for c in conds}:
                raise ValueError(f"repair variable {repair!r} is not one of the rule's variables")
            rule = Rule(str(r.get("description", ""))[:300], tuple(conds), repair)
            if rule.text() in seen:
                raise ValueError("duplicate")
            seen.add(rule.text())
            rules.append(rule)
        except (ValueError, AttributeError, TypeError) as e:
            rejected.append({"index": i, "reason": str(e), "rule": r})
    return rules, rejected


def _cell_fraction(var: Variable, cond: Condition) -> np.ndarray:
    """Per cell of var, the share of the cell where the condition holds (bins: uniform within the bin)."""
    out = np.zeros(var.size)
    for k, label in enumerate(var.cells):
        if label in (MISSING, OUT_OF_RANGE):
            continue
        if var.type == "categorical":
            holds = label in cond.values
            out[k] = float(holds if cond.op == "in" else not holds)
            continue
        lo, hi, x = var.bins[k], var.bins[k + 1], cond.value
        below = min(max((x - lo) / (hi - lo), 0.0), 1.0)  # share of [lo, hi) below x
        out[k] = below if cond.op in ("<", "<=") else 1.0 - below
    return out


def rule_mass(dictionary: Dictionary, rule: Rule, aggregates: DPAggregates) -> tuple[float | None, float]:
    """Share of the DP records in the rule's combination (None if no measured marginal covers it), and a noise bound."""
    names = tuple(dict.fromkeys(c.variable for c in rule.conditions))
    found = aggregates.covering(names)
    if found is None:
        return None, 0.0
    m, p = found
    mask = np.ones(m.shape)
    for c in rule.conditions:
        axis = m.variables.index(c.variable)
        frac = _cell_fraction(dictionary[c.variable], c)
        mask = mask * frac.reshape([-1 if a == axis else 1 for a in range(len(m.shape))])
    mass = float((p * mask).sum())
    noise = 3 * math.sqrt(m.variance * max(1.0, float((mask > 0).sum()))) / max(aggregates.total, 1.0)
    return mass, noise


def propose_knowledge(client: LLMClient, dictionary: Dictionary, aggregates: DPAggregates | None,
                      guard: PIIGuard | None = None) -> Knowledge:
    """Ask for dependencies and impossible combinations; keep what the dictionary and DP aggregates allow."""
    prompt = knowledge_prompt(dictionary)
    obj, rec = client.json(prompt, validate=_knowledge_shape)  # item by item checks below: one bad rule spoils nothing
    deps, reasons, dep_rejected = [], [], []
    for i, d in enumerate(obj.get("dependencies", [])):
        vs = tuple(dict.fromkeys(d.get("variables") or []))
        if not 2 <= len(vs) <= 3 or not all(v in dictionary.variables for v in vs):
            dep_rejected.append({"index": i, "variables": list(d.get("variables") or []), "reason": "needs 2-3 known, distinct variables"})
        elif frozenset(vs) in {frozenset(x) for x in deps}:
            dep_rejected.append({"index": i, "variables": list(vs), "reason": "duplicate"})
        else:
            deps.append(vs)
            reasons.append(str(d.get("reason", ""))[:300])
    rules, rejected = parse_rules(dictionary, obj.get("rules", []))
    kept, checks = [], []
    for r in rules:
        mass, noise = rule_mass(dictionary, r, aggregates) if aggregates is not None else (None, 0.0)
        entry = {"rule": r.text(), "dp_mass": None if mass is None else round(mass, 5)}
        if mass is not None and mass > max(MAX_RULE_MASS, noise):
            rejected.append({"rule": r.text(), "reason": f"contradicted by the DP aggregates: {100 * mass:.1f}% of records "
                                                         "fall in this 'impossible' combination"})
            continue
        entry["status"] = "consistent with the DP aggregates" if mass is not None else "not checkable (no measured marginal covers it)"
        kept.append(r)
        checks.append(entry)

    def clean(s: str) -> str:
        return guard.scrub(s, about_patient=False)[0] if guard is not None else s

    report = {
        "template": prompt.template.id, "prompt_hash": prompt.hash,
        "dependencies": [{"variables": list(d), "reason": clean(r)} for d, r in zip(deps, reasons)],
        "dependencies_rejected": dep_rejected,
        "rules": [{"when_all": [c.__dict__ | {"values": list(c.values)} for c in r.conditions], "text": r.text(),
                   "description": clean(r.description), "repair": r.repair, **chk} for r, chk in zip(kept, checks)],
        "rules_rejected": [{"reason": clean(x["reason"]),
                            "rule": clean(x["rule"] if isinstance(x["rule"], str) else json.dumps(x["rule"], ensure_ascii=False)[:500])}
                           for x in rejected],
    }
    return Knowledge(deps, kept, report)


def knowledge_dependencies(config: LLMConfig, dictionary: Dictionary, progress: Progress | None = None,
                           max_clique_cells: int = 100_000) -> list[tuple[str, ...]]:
    """Dependencies the LLM proposes from the dictionary alone (no privacy cost), for the planner's `extra`.

    In the LLM's order of importance, keeping only those that leave the model's junction tree
    (with the dictionary's declared dependencies) within max_clique_cells per clique. Offline or
    on any LLM failure: [] (the planner then uses the dictionary's structure alone).
    """
    say = progress or (lambda m: None)
    if not config.enabled:
        return []
    try:
        knowledge = propose_knowledge(LLMClient(config), dictionary, None)
    except LLMError as e:
        say(f"LLM knowledge unavailable ({e}); planning with the dictionary's structure alone")
        return []
    domain = dictionary.domain()
    chosen: list[tuple[str, ...]] = []
    base = [tuple(d) for d in dictionary.dependencies]
    for d in knowledge.dependencies:
        if frozenset(d) in {frozenset(x) for x in base + chosen}:
            continue
        tree = JunctionTree(domain, base + chosen + [d] + [(n,) for n in domain])
        if max(math.prod(tree.shape(c)) for c in tree.cliques) <= max_clique_cells:
            chosen.append(d)
    say(f"LLM proposed {len(knowledge.dependencies)} dependencies from the dictionary; {len(chosen)} kept for the plan")
    return chosen


def _knowledge_shape(obj: Any) -> None:
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), list) for k in ("dependencies", "rules")):
        raise ValueError('expected an object {"dependencies": [...], "rules": [...]}')
    if not all(isinstance(x, dict) for k in ("dependencies", "rules") for x in obj[k]):
        raise ValueError("every dependency and rule must be a JSON object")


def _violations(rule: Rule, columns: dict[str, list[str]]) -> np.ndarray:
    n = len(next(iter(columns.values())))
    mask = np.ones(n, dtype=bool)
    for c in rule.conditions:
        col = np.asarray(columns[c.variable], dtype=object)
        present = col != ""
        if c.op in ("in", "not_in"):
            isin = np.isin(col, list(c.values))
            mask &= present & (isin if c.op == "in" else ~isin)
        else:
            x = np.array([float(v) if v not in ("", OUT_OF_RANGE) else np.nan for v in col])
            with np.errstate(invalid="ignore"):
                mask &= {"<": x < c.value, "<=": x <= c.value, ">": x > c.value, ">=": x >= c.value}[c.op]
    return mask


def apply_rules(dictionary: Dictionary, rules: Sequence[Rule], columns: dict[str, list[str]], aggregates: DPAggregates,
                rng: np.random.Generator, max_tries: int = 20) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Repair records that break a rule: redraw the rule's repair variable from its DP 1-way marginal
    until no rule is broken (else missing, if allowed). Returns new columns and counts per rule."""
    cols = {k: list(v) for k, v in columns.items()}
    if not rules or not cols or not len(next(iter(cols.values()))):
        return cols, {"records_checked": len(next(iter(cols.values()))) if cols else 0, "violations": {}, "unrepaired": 0}
    counts: dict[str, int] = {}
    unrepaired = 0
    for _ in range(3):  # a repair may break another rule: a few passes
        changed = False
        for rule in rules:
            bad = np.flatnonzero(_violations(rule, cols))
            if not len(bad):
                continue
            counts[rule.text()] = counts.get(rule.text(), 0) + len(bad)
            var = dictionary[rule.repair]
            p = aggregates.probabilities((rule.repair,))
            p = np.full(var.size, 1 / var.size) if p is None else p
            for i in bad:
                for _try in range(max_tries):
                    v = _value_from_cell(var, int(rng.choice(var.size, p=p)), rng)
                    cols[rule.repair][i] = v
                    if not any(_violations_one(r, cols, i) for r in rules):
                        break
                else:
                    cols[rule.repair][i] = "" if var.missing else cols[rule.repair][i]
            changed = True
        if not changed:
            break
    for rule in rules:
        unrepaired += int(_violations(rule, cols).sum())
    return cols, {"records_checked": len(next(iter(cols.values()))), "violations": counts, "unrepaired": unrepaired}


def _violations_one(rule: Rule, cols: dict[str, list[str]], i: int) -> bool:
    return bool(_violations(rule, {c.variable: [cols[c.variable][i]] for c in rule.conditions})[0])


def _value_from_cell(var: Variable, cell: int, rng: np.random.Generator) -> str:
    """A record value in a cell: the label, "" for missing, a number on the precision grid for a bin."""
    label = var.cells[cell]
    if label == MISSING:
        return ""
    if var.type == "categorical" or label == OUT_OF_RANGE:
        return label
    step = 10.0 ** -var.precision
    lo, hi = var.bins[cell], var.bins[cell + 1]
    first = math.ceil(round(lo / step, 9))
    last = math.floor(round(hi / step, 9)) if cell == var.n_bins - 1 else math.ceil(round(hi / step, 9)) - 1
    k = int(rng.integers(first, max(last, first) + 1))
    return f"{k * step:.{var.precision}f}"


# ----------------------------------------------------------------------------- LLM-first generation
def validate_record(dictionary: Dictionary, raw: Any) -> tuple[dict[str, str] | None, int, str]:
    """An LLM-written record in the dictionary's vocabulary, the number of values repaired, and why it
    was rejected (if it was). Repairs: category spelling, unknown -> missing where allowed, numbers
    rounded to the precision, out-of-range numbers by the dictionary's policy (clip / missing / cell)."""
    if not isinstance(raw, dict):
        return None, 0, "not an object"
    out, fixes = {}, 0
    for name, var in dictionary.variables.items():
        v = raw.get(name)
        if v is None or (isinstance(v, str) and _norm(v) in ("", "unknown", "missing", "n/a", "na", "none", "null")):
            if not var.missing:
                return None, fixes, f"{name} is missing but the dictionary does not allow it"
            fixes += v not in (None, "")
            out[name] = ""
            continue
        if var.type == "categorical":
            m = _match_category(var, v)
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


# ----------------------------------------------------------------------------- notes
def write_notes(client: LLMClient, dictionary: Dictionary, columns: dict[str, list[str]], language: str,
                max_tier: int, guard: PIIGuard, limit: int | None = None,
                progress: Progress | None = None) -> tuple[bytes, dict[str, Any]]:
    """notes.jsonl: one note per record (up to limit), each conditioned only on that record, PII-guarded."""
    n = len(next(iter(columns.values()))) if columns else 0
    n = n if limit is None else min(n, limit)
    def one(i):
        try:
            p = note_prompt(dictionary, SyntheticRecord.from_columns(dictionary, columns, i), language, max_tier)
            return client.text(p, max_tokens=client.config.note_max_tokens)[0], ""
        except (LLMError, ValueError) as e:
            return None, str(e)

    lines, failed = [], 0
    for i, (text, err) in enumerate(client.map(one, range(n))):
        if text is None or not text.strip():
            failed += 1
            lines.append({"record": i, "language": language, "note": None, "error": (err or "empty reply")[:200]})
            continue
        clean, findings = guard.scrub(text.strip())
        entry = {"record": i, "language": language, "note": clean}
        if findings:
            entry["pii"] = {f.label: sum(1 for g in findings if g.label == f.label) for f in findings}
        lines.append(entry)
    if progress:
        progress(f"LLM notes: {n - failed} of {n} records, in {language}")
    data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode()
    return data, {"records": n, "notes": n - failed, "failed": failed, "language": language,
                  "template": TEMPLATES["note"].id, "max_tier_in_prompt": max_tier}


# ----------------------------------------------------------------------------- the stage
def offline_section(reason: str = OFFLINE_REASON) -> dict[str, Any]:
    return {"used": False, "reason": reason}


def run_llm_stage(config: LLMConfig, dictionary: Dictionary, measurements: list[Measurement],
                  columns: dict[str, list[str]], rng: np.random.Generator,
                  progress: Progress) -> LLMStageResult:
    """Run the configured LLM uses on a release's DP aggregates and synthetic records.

    `measurements`: the pooled DP measurements the model was fitted to; `columns`: the synthetic
    records (dictionary variable -> values, "" = missing). Never raises for LLM trouble: a use
    that fails is recorded and the release goes on with the statistical engine's records.
    """
    if not config.enabled:
        return LLMStageResult({}, columns, offline_section())
    config.check()
    aggregates = DPAggregates.from_measurements(dictionary, measurements)
    client = LLMClient(config)
    max_tier = text_max_tier(dictionary.content)
    vocab = [dictionary.name] + [w for v in dictionary.variables.values() for w in (v.name, v.description, *v.categories)]
    guard = PIIGuard(max_tier, vocabulary=vocab)
    language = config.language or (dictionary.content.get("llm") or {}).get("language", "en")
    dict_cols = {n: columns[n] for n in dictionary.names}
    extra_cols = {k: v for k, v in columns.items() if k not in dictionary.variables}  # e.g. a released site column
    files: dict[str, bytes] = {}
    uses: dict[str, Any] = {}
    knowledge: Knowledge | None = None
    progress(f"LLM stage: model {config.model} at {config.host}, uses: {', '.join(config.uses)}")

    if "knowledge" in config.uses or ("generate" in config.uses and "rule" in config.styles):
        try:
            knowledge = propose_knowledge(client, dictionary, aggregates, guard)
        except LLMError as e:
            uses["knowledge"] = {"ran": False, "error": str(e)}
            progress(f"LLM knowledge failed: {e}")
        else:
            rules_for_records = knowledge.rules if "knowledge" in config.uses else []
            dict_cols, repairs = apply_rules(dictionary, rules_for_records, dict_cols, aggregates, rng)
            files["llm_rules.json"] = (json.dumps({**knowledge.report, "repairs": repairs}, indent=1, ensure_ascii=False)
                                       + "\n").encode()
            uses["knowledge"] = {"ran": True, "dependencies": [list(d) for d in knowledge.dependencies],
                                 "rules_accepted": len(knowledge.rules),
                                 "rules_rejected": len(knowledge.report["rules_rejected"]),
                                 "records_repaired": sum(repairs["violations"].values()),
                                 "unrepaired": repairs["unrepaired"], "file": "llm_rules.json"}
            progress(f"LLM knowledge: {len(knowledge.dependencies)} dependencies, {len(knowledge.rules)} rules accepted "
                     f"({len(knowledge.report['rules_rejected'])} rejected); {sum(repairs['violations'].values())} record repairs")

    if "generate" in config.uses:
        n_out = config.generate_rows or len(next(iter(dict_cols.values())))
        try:
            gen_cols, gen = _generate_and_calibrate(client, config, dictionary, aggregates, dict_cols, n_out,
                                                    knowledge.rules if knowledge else [], rng, progress)
        except (LLMError, ValueError) as e:
            uses["generate"] = {"ran": False, "error": str(e)}
        else:
            if knowledge:
                gen_cols, rep = apply_rules(dictionary, knowledge.rules, gen_cols, aggregates, rng)
                gen["rule_repairs"] = sum(rep["violations"].values())
            if config.generate_output == "records" and gen_cols[dictionary.names[0]]:
                dict_cols, extra_cols = gen_cols, {}
                gen["output"] = "records.csv (the release's records are LLM-first, calibrated)"
            else:
                files["llm_records.csv"] = to_csv(gen_cols)
                gen["output"] = "llm_records.csv"
            uses["generate"] = gen

    if "notes" in config.uses:
        data, stats = write_notes(client, dictionary, dict_cols, language, max_tier, guard, config.notes_limit, progress)
        if stats["notes"]:
            files["notes.jsonl"] = data
            stats["file"] = "notes.jsonl"
        uses["notes"] = {"ran": stats["notes"] > 0, **stats}

    files["llm_calls.jsonl"] = "".join(json.dumps(c.__dict__) + "\n" for c in client.calls).encode()
    usage = client.usage()
    used = any(c.ok for c in client.calls)
    section: dict[str, Any] = {
        "used": used, "model": config.model, "base_url_host": config.host, "api_key_from_environment": api_key() is not None,
        **usage, "uses": uses, "templates": _templates(client), "pii_guard": guard.report(),
        "settings": {"temperature": config.temperature, "seed": config.seed, "max_tokens": config.max_tokens,
                     "timeout_s": config.timeout, "max_retries": config.max_retries, "concurrency": config.concurrency,
                     "reask": config.reask, "structured": config.structured, "language": language,
                     "styles": list(config.styles), "batch_size": config.batch_size, "cache": bool(config.cache_dir)},
        "inputs": "the public dictionary, the DP aggregates and synthetic records only; no site data (no privacy cost)",
    }
    if not used:
        section["reason"] = "the LLM endpoint gave no usable answer; records come from the statistical engine alone"
    return LLMStageResult(files, extra_cols | dict_cols, section, list(knowledge.dependencies) if knowledge else [])


def _generate_and_calibrate(client: LLMClient, config: LLMConfig, dictionary: Dictionary, aggregates: DPAggregates,
                            columns: dict[str, list[str]], n_out: int, rules: Sequence[Rule], rng: np.random.Generator,
                            progress: Progress) -> tuple[dict[str, list[str]], dict[str, Any]]:
    n_pool = max(n_out, int(math.ceil(n_out * config.pool_factor)))
    n_have = len(next(iter(columns.values())))
    examples = [SyntheticRecord.from_columns(dictionary, columns, int(i))
                for i in rng.choice(n_have, size=min(n_have, 200), replace=False)] if n_have else []
    pool = {n: [] for n in dictionary.names}
    per_style = []
    for k, style in enumerate(config.styles):
        share = n_pool // len(config.styles) + (1 if k < n_pool % len(config.styles) else 0)
        cols, stats = generate_pool(client, dictionary, aggregates, share, style, examples, rules, progress)
        per_style.append(stats)
        for n in dictionary.names:
            pool[n] += cols[n]
    if not pool[dictionary.names[0]]:
        raise LLMError("LLM-first generation produced no valid record")
    out, cal = calibrate(dictionary, aggregates, pool, n_out, rng)
    progress(f"LLM-first records calibrated to the DP marginals: mean 1-way TVD {cal['tvd_before'].get('1')} -> "
             f"{cal['tvd_after'].get('1')}, 2-way {cal['tvd_before'].get('2')} -> {cal['tvd_after'].get('2')}")
    return out, {"ran": True, "styles": per_style, "calibration": cal}


def _templates(client: LLMClient) -> dict[str, Any]:
    by: dict[str, list[str]] = {}
    for c in client.calls:
        by.setdefault(c.template, []).append(c.prompt_hash)
    out = {}
    for t, hashes in sorted(by.items()):
        entry: dict[str, Any] = {"calls": len(hashes),
                                 "prompts_digest": "sha256:" + hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()}
        if len(hashes) <= 10:
            entry["prompt_hashes"] = hashes
        out[t] = entry
    return out


# ----------------------------------------------------------------------------- benchmark
def demo_measurements(workdir: Path, epsilon: float = 4.0,
                      mappings: dict[str, Path] | None = None) -> tuple[Dictionary, list[Measurement]]:
    """DP marginals of the demo consortium the honest way: the four real site guards answer the
    release's signed one-round plan in this process (OpenDP noise, ledgers, receipts), the
    coordinator verifies and sums (`benchmark.Federation`, `pipeline.collect`). `mappings`
    replaces a site's mapping file (tests plant values in a site table this way)."""
    from .aggregate import aggregate
    from .benchmark import Federation, demo_dataset

    ds = demo_dataset(mappings)
    (first,), _ = Federation(ds, workdir).collect(ds, epsilon, site_variable="pooled", compress=False)
    return ds.dictionary, aggregate(first.plan, first.results, ds.dictionary)


def bench_llm_first(config: LLMConfig, rows: int = 1000, styles: Sequence[str] = ("definition", "example", "rule"),
                    epsilon: float = 4.0, seed: int = 0, progress: Progress | None = None,
                    engine_iters: int = 1000) -> dict[str, Any]:
    """LLM-first generation on the demo consortium against config's endpoint: fidelity (mean 1-/2-way
    TVD to the DP marginals) before and after calibration, tokens per 1,000 records, records per second."""
    from .model import estimate
    from .records import decode

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
    for style in styles:
        calls_before = len(client.calls)
        n_pool = int(math.ceil(rows * config.pool_factor))
        t1 = time.perf_counter()
        pool, stats = generate_pool(client, dictionary, aggregates, n_pool, style, examples, (), say)
        gen_s = time.perf_counter() - t1
        valid = stats["records_valid"]
        entry = {k: stats[k] for k in ("template", "batches", "batches_failed", "records_returned", "records_valid",
                                       "records_rejected", "values_repaired", "rejections")}
        calls = client.calls[calls_before:]
        tokens = sum(c.prompt_tokens + c.completion_tokens for c in calls)
        entry.update(prompt_tokens=sum(c.prompt_tokens for c in calls), completion_tokens=sum(c.completion_tokens for c in calls),
                     tokens_per_1000_records=round(1000 * tokens / valid, 1) if valid else None,
                     records_per_second=round(valid / gen_s, 2) if gen_s > 0 else None, seconds=round(gen_s, 3),
                     cached_calls=sum(c.cached for c in calls))
        if valid:
            _, cal = calibrate(dictionary, aggregates, pool, rows, rng)
            entry.update(tvd_before=cal["tvd_before"], tvd_after=cal["tvd_after"],
                         effective_sample_size=cal["effective_sample_size"], distinct_records=cal["distinct_records"])
        out["styles"][style] = entry
        say(f"{style}: {valid} valid records, TVD 1-way {entry.get('tvd_before', {}).get('1')} -> "
            f"{entry.get('tvd_after', {}).get('1')}, 2-way {entry.get('tvd_before', {}).get('2')} -> "
            f"{entry.get('tvd_after', {}).get('2')}")
    out["usage"] = client.usage()
    return out


def bench_markdown(result: dict[str, Any]) -> str:
    e = result["endpoint"]
    lines = ["# LLM-first generation on the demo consortium", "",
             f"Endpoint host `{e['base_url_host']}`, model `{e['model']}`; {result['rows']} output records, "
             f"epsilon {result['epsilon_per_site']:g} per site; batch {result['batch_size']}, pool factor {result['pool_factor']:g}.",
             "", "| style | valid / returned | 1-way TVD before -> after | 2-way TVD before -> after | tokens / 1,000 records | records / s |",
             "|---|---|---|---|---|---|"]
    for style, s in result["styles"].items():
        b, a = s.get("tvd_before", {}), s.get("tvd_after", {})
        lines.append(f"| {style} | {s['records_valid']} / {s['records_returned']} | {b.get('1')} -> {a.get('1')} | "
                     f"{b.get('2')} -> {a.get('2')} | {s['tokens_per_1000_records']} | {s['records_per_second']} |")
    t = result["statistical_engine"]["tvd"]
    lines += ["", f"Statistical engine alone (same DP marginals, {result['rows']} records): 1-way TVD {t.get('1')}, "
              f"2-way TVD {t.get('2')}.", ""]
    return "\n".join(lines)


def add_bench_arguments(p) -> None:
    from .llm import add_llm_options

    add_llm_options(p)
    p.add_argument("--rows", type=int, default=1000, help="output records per prompt style (default 1000)")
    p.add_argument("--batch-size", type=int, default=20, help="records per LLM call (default 20)")
    p.add_argument("--pool-factor", type=float, default=1.5, help="records generated per output record before calibration")
    p.add_argument("--epsilon", type=float, default=4.0, help="per-site budget of the DP marginals (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-llm", help="directory for bench-llm.json and bench-llm.md")
    p.add_argument("--engine-iters", type=int, default=1000, help="estimator iterations of the statistical-engine baseline")
    p.set_defaults(llm_styles="definition,example,rule", llm_cache="")


def run_bench_cli(args) -> int:
    """`ppsehr bench llm`: against --llm-base-url, or by default a local fake server started here."""
    from ..common.errors import PpsehrError
    from .llm import llm_config_from_args

    fake = None
    if not args.llm_base_url:
        fake = _start_fake_server()
        args.llm_base_url, args.llm_model = fake.base_url, args.llm_model or "fake-model"
        print(f"no --llm-base-url: using the local fake OpenAI-compatible server at {fake.base_url} "
              "(measures the machinery, not a model)", flush=True)
    try:
        cfg = llm_config_from_args(args, batch_size=args.batch_size, pool_factor=args.pool_factor, seed=args.seed)
        result = bench_llm_first(cfg, args.rows, cfg.styles, args.epsilon, args.seed, lambda m: print(m, flush=True),
                                 args.engine_iters)
    except LLMError as e:
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

    from ..common.errors import PpsehrError

    path = Path(__file__).resolve().parents[1] / "tests" / "fake_openai_server.py"
    if not path.exists():
        raise PpsehrError("the local fake server ships in the source tree's tests/; pass --llm-base-url and --llm-model")
    spec = importlib.util.spec_from_file_location("ppsehr_fake_openai_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeOpenAI().start()
