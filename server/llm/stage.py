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
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ...common.dictionary import Dictionary
from ..model.graphical import Measurement
from ..model.records import to_csv
from .client import LLMClient, LLMConfig, LLMError, api_key
from .generate import calibrate, generate_pool
from .knowledge import Knowledge, apply_rules, propose_knowledge
from .notes import write_notes
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


