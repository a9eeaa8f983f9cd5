"""The LLM stage of a release: knowledge, LLM-first generation and notes, from public inputs only.

Each use is optional and recorded in the manifest with model, template versions and prompt
hashes: `knowledge` (knowledge.py), `generate` (generate.py), `notes` (notes.py). Everything
here is post-processing of DP outputs and costs no privacy budget. With no endpoint configured
nothing is called and the release says the statistical engine alone was used.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ...common.dictionary import Dictionary
from ..model.graphical import Measurement
from ..model.records import to_csv
from .client import EndpointMemory, LLMClient, LLMConfig, LLMError, api_key
from .generate import calibrate, generate_pool
from .knowledge import Knowledge, apply_rules, propose_knowledge
from .notes import _emit, write_notes
from .pii import PIIGuard, text_max_tier
from .prompts import DPAggregates, Rule, SyntheticRecord

Progress = Callable[[str], None]
OFFLINE_REASON = "no LLM endpoint configured; records come from the statistical engine alone"


@dataclass
class LLMStageResult:
    files: dict[str, bytes]
    columns: dict[str, list[str]]
    manifest_section: dict[str, Any]
    dependencies: list[tuple[str, ...]] = field(default_factory=list)


def offline_section(reason: str = OFFLINE_REASON) -> dict[str, Any]:
    return {"used": False, "reason": reason}


KNOWLEDGE_SHARE = 0.25  # of the time budget, at most, for the knowledge call
GENERATE_SHARE = 0.6  # of what is left when generation starts, if notes follow


def run_llm_stage(config: LLMConfig, dictionary: Dictionary, measurements: list[Measurement],
                  columns: dict[str, list[str]], rng: np.random.Generator,
                  progress: Progress, memory: EndpointMemory | None = None) -> LLMStageResult:
    """Run the configured LLM uses on a release's DP aggregates and synthetic records.

    `measurements`: the pooled DP measurements the model was fitted to; `columns`: the synthetic
    records (dictionary variable -> values, "" = missing); `memory`: what the release learnt about
    the endpoint before (e.g. the planner's knowledge call). Never raises for LLM trouble: a use
    that fails or runs out of the time budget (`config.time_budget`) is recorded, and the release
    goes on with what it has (the statistical engine's records, the notes written so far).
    """
    if not config.enabled:
        return LLMStageResult({}, columns, offline_section())
    t0 = time.monotonic()
    try:
        return _run(config, dictionary, measurements, columns, rng, progress, memory, t0)
    except Exception as e:  # a bug or an unforeseen answer must not cost the release its paid measurements
        reason = f"the LLM stage stopped ({type(e).__name__}: {str(e)[:200]}); records come from the statistical engine alone"
        _emit(progress, f"LLM stage degraded: {reason}")
        return LLMStageResult({}, columns, {**offline_section(reason), "model": config.model, "base_url_host": config.host,
                                            "degraded": True, "degradations": [reason],
                                            "elapsed_s": round(time.monotonic() - t0, 1)})


def _run(config: LLMConfig, dictionary: Dictionary, measurements: list[Measurement], columns: dict[str, list[str]],
         rng: np.random.Generator, progress: Progress, memory: EndpointMemory | None, t0: float) -> LLMStageResult:
    config.check()
    aggregates = DPAggregates.from_measurements(dictionary, measurements)
    client = LLMClient(config, memory=memory)
    budget = config.time_budget or None
    end = None if budget is None else t0 + budget

    def left() -> float | None:
        return None if end is None else end - time.monotonic()

    max_tier = text_max_tier(dictionary.content)
    vocab = [dictionary.name] + [w for v in dictionary.variables.values() for w in (v.name, v.description, *v.categories)]
    guard = PIIGuard(max_tier, vocabulary=vocab)
    language = config.language or (dictionary.content.get("llm") or {}).get("language", "en")
    dict_cols = {n: columns[n] for n in dictionary.names}
    extra_cols = {k: v for k, v in columns.items() if k not in dictionary.variables}  # e.g. a released site column
    files: dict[str, bytes] = {}
    uses: dict[str, Any] = {}
    degradations: list[str] = []
    knowledge: Knowledge | None = None
    _emit(progress, f"LLM stage: model {config.model} at {config.host}, uses: {', '.join(config.uses)}"
          + (f", time budget {budget:.0f} s" if budget else ""))

    if "knowledge" in config.uses or ("generate" in config.uses and "rule" in config.styles):
        client.set_deadline(None if budget is None else min(left(), KNOWLEDGE_SHARE * budget))
        try:
            knowledge = propose_knowledge(client, dictionary, aggregates, guard)
        except LLMError as e:
            uses["knowledge"] = {"ran": False, "status": "failed", "error": str(e)}
            degradations.append(f"knowledge: {_short(e)}; no rules applied")
            _emit(progress, f"LLM knowledge failed: {e}")
        except Exception as e:
            uses["knowledge"] = {"ran": False, "status": "failed", "error": f"internal error: {type(e).__name__}: {e}"}
            degradations.append(f"knowledge: internal error ({type(e).__name__}); no rules applied")
        else:
            rules_for_records = knowledge.rules if "knowledge" in config.uses else []
            dict_cols, repairs = apply_rules(dictionary, rules_for_records, dict_cols, aggregates, rng)
            files["llm_rules.json"] = (json.dumps({**knowledge.report, "repairs": repairs}, indent=1, ensure_ascii=False)
                                       + "\n").encode()
            uses["knowledge"] = {"ran": True, "status": "ok", "dependencies": [list(d) for d in knowledge.dependencies],
                                 "rules_accepted": len(knowledge.rules),
                                 "rules_rejected": len(knowledge.report["rules_rejected"]),
                                 "records_repaired": sum(repairs["violations"].values()),
                                 "unrepaired": repairs["unrepaired"], "file": "llm_rules.json"}
            _emit(progress, f"LLM knowledge: {len(knowledge.dependencies)} dependencies, {len(knowledge.rules)} rules accepted "
                  f"({len(knowledge.report['rules_rejected'])} rejected); {sum(repairs['violations'].values())} record repairs")

    if "generate" in config.uses:
        n_out = config.generate_rows or len(next(iter(dict_cols.values())))
        share = None if budget is None else (left() * (GENERATE_SHARE if "notes" in config.uses else 1.0))
        client.set_deadline(share)
        try:
            gen_cols, gen = _generate_and_calibrate(client, config, dictionary, aggregates, dict_cols, n_out,
                                                    knowledge.rules if knowledge else [], rng, progress)
        except (LLMError, ValueError) as e:
            uses["generate"] = {"ran": False, "status": "failed", "error": str(e)}
            degradations.append(f"generate: {_short(e)}; records come from the statistical engine")
            _emit(progress, f"LLM-first generation failed: {e}")
        except Exception as e:
            uses["generate"] = {"ran": False, "status": "failed", "error": f"internal error: {type(e).__name__}: {e}"}
            degradations.append(f"generate: internal error ({type(e).__name__}); records come from the statistical engine")
        else:
            if knowledge:
                gen_cols, rep = apply_rules(dictionary, knowledge.rules, gen_cols, aggregates, rng)
                gen["rule_repairs"] = sum(rep["violations"].values())
            gen["status"] = "ok"
            short = [s for s in gen["styles"] if s["records_valid"] < s["records_requested"]]
            if short:
                gen["status"] = "partial"
                degradations.append("generate: " + "; ".join(
                    f"{s['style']} style {s['records_valid']} of {s['records_requested']} records"
                    + (f" ({s['shortfall_reason'][:120]})" if s.get("shortfall_reason") else "") for s in short))
            cal = gen["calibration"]
            if cal.get("warnings"):
                degradations.append("generate: " + " ".join(cal["warnings"])[:300])
            if config.generate_output == "records" and gen_cols[dictionary.names[0]]:
                dict_cols, extra_cols = gen_cols, {}
                gen["output"] = "records.csv (the release's records are LLM-first, calibrated)"
            else:
                files["llm_records.csv"] = to_csv(gen_cols)
                gen["output"] = "llm_records.csv"
            uses["generate"] = gen

    if "notes" in config.uses:
        client.set_deadline(left())
        try:
            data, stats = write_notes(client, dictionary, dict_cols, language, max_tier, guard, config.notes_limit, progress)
        except Exception as e:  # write_notes records LLM failures per note; this is the safety net
            stats, data = {"notes": 0, "error": f"internal error: {type(e).__name__}: {e}"}, b""
        if stats["notes"]:
            files["notes.jsonl"] = data
            stats["file"] = "notes.jsonl"
        wanted = stats.get("records", 0)
        stats["status"] = "ok" if stats["notes"] == wanted else ("partial" if stats["notes"] else "failed")
        if stats["notes"] < wanted:
            why = [f"{stats['skipped_time_budget']} not written (time budget spent)"] * bool(stats.get("skipped_time_budget"))
            why += [f"{stats['dropped_contradicting']} dropped as contradicting their record"] * bool(stats.get("dropped_contradicting"))
            why += [f"{stats['dropped_unrelated']} dropped as not about their record"] * bool(stats.get("dropped_unrelated"))
            other = stats.get("failed", 0) - stats.get("dropped_contradicting", 0) - stats.get("dropped_unrelated", 0)
            why += [f"{other} failed"] * bool(other > 0) + [str(stats.get("error", ""))[:160]] * bool(stats.get("error"))
            degradations.append(f"notes: {stats['notes']} of {wanted} written" + (f" ({', '.join(why)})" if why else ""))
        uses["notes"] = {"ran": stats["notes"] > 0, **stats}

    client.set_deadline(None)
    files["llm_calls.jsonl"] = "".join(json.dumps(c.__dict__) + "\n" for c in client.calls).encode()
    usage = client.usage()
    used = any(c.ok for c in client.calls)
    elapsed = time.monotonic() - t0
    section: dict[str, Any] = {
        "used": used, "model": config.model, "base_url_host": config.host, "api_key_from_environment": api_key() is not None,
        **usage, "uses": uses, "templates": _templates(client), "pii_guard": guard.report(),
        "degraded": bool(degradations), "degradations": degradations,
        "time_budget_s": budget, "elapsed_s": round(elapsed, 1),
        "settings": {"temperature": config.temperature, "seed": config.seed, "max_tokens": config.max_tokens,
                     "timeout_s": config.timeout if config.timeout is not None else "per request, from the endpoint's speed",
                     "context_tokens": client.context or None, "max_retries": config.max_retries,
                     "concurrency": config.concurrency, "reask": config.reask, "structured": config.structured,
                     "language": language, "styles": list(config.styles), "batch_size": config.batch_size,
                     "notes_limit": config.notes_limit, "cache": bool(config.cache_dir),
                     "profile": config.profile or None},
        "inputs": "the public dictionary, the DP aggregates and synthetic records only; no site data (no privacy cost)",
    }
    if not used:
        section["reason"] = "the LLM endpoint gave no usable answer; records come from the statistical engine alone"
    if degradations:
        _emit(progress, "LLM stage degraded: " + " | ".join(degradations)[:600])
    _emit(progress, f"LLM stage done in {elapsed:.0f} s" + (f" (budget {budget:.0f} s)" if budget else ""))
    return LLMStageResult(files, extra_cols | dict_cols, section, list(knowledge.dependencies) if knowledge else [])


def _short(e: Exception) -> str:
    return str(e).split("\n")[0][:160]


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
        why = "; ".join(f"{s['style']}: {s.get('shortfall_reason') or (s['errors'] or [''])[0]}" for s in per_style)
        raise LLMError(f"LLM-first generation produced no valid record ({why[:400]})")
    out, cal = calibrate(dictionary, aggregates, pool, n_out, rng)
    _emit(progress, f"LLM-first records {'calibrated to' if cal['status'] == 'calibrated' else 'NOT calibrated to'} the DP "
          f"marginals: mean 1-way TVD {cal['tvd_before'].get('1')} -> {cal['tvd_after'].get('1')}, 2-way "
          f"{cal['tvd_before'].get('2')} -> {cal['tvd_after'].get('2')}" + "".join(f"; {w}" for w in cal["warnings"]))
    return out, {"ran": True, "styles": per_style, "validity": {s["style"]: s["valid_rate"] for s in per_style},
                 "calibration": cal}


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


