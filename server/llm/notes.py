"""Clinical notes: one short note per synthetic record, conditioned only on that record, PII-guarded."""

from __future__ import annotations

import json
from typing import Any, Callable

from ...common.dictionary import Dictionary
from .client import LLMClient, LLMError
from .pii import PIIGuard
from .prompts import TEMPLATES, SyntheticRecord, note_prompt

Progress = Callable[[str], None]


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


