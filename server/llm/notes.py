"""Clinical notes: one short narrative per synthetic record, conditioned only on that record,
checked against it, PII-guarded.

A note is checked against its record before it is kept (`check_note`): the numbers it states
for the record's numeric variables (found by unit, or by the variable's words next to the number)
must fall in the same dictionary bin as the record's value; a category of another value (e.g.
"typical angina" for a record with atypical angina), the other sex (English pronouns and nouns)
or a number on the wrong side of a categorical variable's threshold ("Fasting blood glucose above
120 mg/dL" = no, note: "fasting glucose 145 mg/dL") contradicts the record. A contradicting note is
written again (another seed) up to `note_retries` times, then dropped; the counts are in the
manifest. The check is deliberately narrow (it flags what it can attribute to a variable and
misses paraphrases); see docs/llm.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from ...common.dictionary import Dictionary, Variable
from .client import LLMClient, LLMError, LLMTimeBudgetError
from .pii import PIIGuard
from .prompts import TEMPLATES, SyntheticRecord, note_prompt

Progress = Callable[..., None]

_STOP = {"the", "and", "of", "at", "on", "in", "by", "to", "or", "a", "an", "for", "with", "from", "during", "any", "than",
         "relative", "result", "number", "type", "recorded", "value", "level", "levels", "test", "above", "below", "over",
         "under", "into", "per", "probable", "definite", "major", "maximum", "minimum", "achieved", "admission"}
_GENERIC_LABELS = {"yes", "no", "normal", "abnormal", "absent", "present", "none", "other", "unknown", "flat", "high",
                   "low", "mild", "moderate", "severe", "positive", "negative", "true", "false"}
_NEGATION = re.compile(r"\b(no|not|without|denies|denied|absence of|absent|negative for|free of|never|nor)\b[\w\s,-]{0,24}$", re.I)
_COMPARISON = re.compile(r"(above|over|below|under|greater than|more than|less than|exceed(?:s|ing)?|higher than|lower than|"
                         r"at least|at most|up to|<|>|≤|≥|<=|>=)\s*$", re.I)
_UNITS = {  # UCUM unit -> how notes write it after a number
    "a": r"(?:\s*-?\s*years?(?:\s*-?\s*old)?|\s*-?\s*year\s*-?\s*old|\s*yrs?\b|\s*y/?o\b)",
    "mm[Hg]": r"\s*mm\s*\[?hg\]?", "mmHg": r"\s*mm\s*\[?hg\]?",
    "mg/dL": r"\s*mg\s*/\s*dl", "mmol/L": r"\s*mmol\s*/\s*l",
    "/min": r"\s*(?:/\s*min|bpm|beats?\s*(?:per|/|a)\s*min(?:ute)?)",
    "mm": r"\s*mm(?!\s*\[?hg)\b", "kg": r"\s*kg\b", "cm": r"\s*cm\b", "%": r"\s*%", "kg/m2": r"\s*kg\s*/\s*m(?:2|²)",
}
_NUMBER = re.compile(r"(?<![\w.,/])(-?\d+(?:[.,]\d+)?)(?:\s*/\s*(\d+(?:[.,]\d+)?))?")
_NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                 "nine": 9, "ten": 10, "single": 1}
_FEMALE = re.compile(r"\b(she|her|hers|herself|woman|female|lady|girl|mrs|ms)\b", re.I)
_MALE = re.compile(r"\b(he|him|his|himself|man|male|gentleman|boy|mr)\b", re.I)


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOP and len(w) >= 3]


def _threshold(var: Variable) -> tuple[str, float, str] | None:
    """A yes/no variable defined by a threshold in its description ("... above 120 mg/dL"): (op, value, unit)."""
    if var.type != "categorical" or set(var.categories) != {"no", "yes"}:
        return None
    m = re.search(r"(above|over|greater than|more than|>=?|below|under|less than|<=?)\s*(-?\d+(?:\.\d+)?)\s*([^\s,;)]*)",
                  var.description or "", re.I)
    if not m:
        return None
    op = ">" if m.group(1).lower() in ("above", "over", "greater than", "more than", ">", ">=") else "<"
    return op, float(m.group(2)), m.group(3)


@dataclass
class _VarWords:
    keywords: list[str]  # distinctive words (this variable's, no other's)
    unit: str | None  # regex of the unit after a number


class NoteChecker:
    """Finds what a note states that contradicts its record (see the module docstring)."""

    def __init__(self, dictionary: Dictionary):
        self.dictionary = dictionary
        words = {n: set(_words(f"{v.description} {n}")) for n, v in dictionary.variables.items()}
        counts: dict[str, int] = {}
        for ws in words.values():
            for w in ws:
                counts[w] = counts.get(w, 0) + 1
        self.vars: dict[str, _VarWords] = {}
        for name, var in dictionary.variables.items():
            keys = sorted(w for w in words[name] if counts[w] == 1)
            unit = var.unit or (_threshold(var) or ("", 0, ""))[2]
            self.vars[name] = _VarWords(keys, _UNITS.get(unit, re.escape(unit) if unit else None))
        labels: dict[str, list[tuple[str, str]]] = {}
        for name, var in dictionary.variables.items():
            if var.type != "categorical" or _threshold(var):
                continue
            for c in var.categories:
                text = c.replace("_", " ").strip().lower()
                if text in _GENERIC_LABELS or len(text) < 5 or text.isdigit():
                    continue
                labels.setdefault(text, []).append((name, c))
        # a label two variables share says nothing about either
        self.labels = {t: v[0] for t, v in labels.items() if len(v) == 1}
        self.label_rx = {t: re.compile(r"(?<![\w-])" + r"[\s_-]*".join(map(re.escape, t.split())) + r"(?![\w-])", re.I)
                         for t in self.labels}
        self.sex = next((n for n, v in dictionary.variables.items()
                         if v.type == "categorical" and {c.lower() for c in v.categories} >= {"female", "male"}), None)
        self.counts = {n: v for n, v in dictionary.variables.items()
                       if v.type == "categorical" and v.categories and all(c.isdigit() for c in v.categories)}

    # ------------------------------------------------------------------ attribution
    def _near(self, text: str, start: int, end: int, before: int = 60, after: int = 30) -> str | None:
        """The variable whose distinctive words are closest to text[start:end], within the same sentence."""
        left = text[max(0, start - before):start]
        left = re.split(r"[.;!?\n]", left)[-1]
        right = re.split(r"[.;!?\n]", text[end:end + after])[0]
        best, dist = None, 10 ** 9
        for name, vw in self.vars.items():
            for k in vw.keywords:
                for m in re.finditer(r"\b" + re.escape(k), left, re.I):
                    d = len(left) - m.end()
                    if d < dist:
                        best, dist = name, d
                for m in re.finditer(r"\b" + re.escape(k), right, re.I):
                    d = m.start() + 5  # a word after the number binds less than one before it
                    if d < dist:
                        best, dist = name, d
        return best

    def statements(self, text: str) -> list[tuple[str, float, str]]:
        """(variable, number, how it was attributed) for the numbers in a note that belong to a variable."""
        out = []
        for m in _NUMBER.finditer(text):
            x = float(m.group(1).replace(",", "."))
            start, end = m.start(), m.end()
            if _COMPARISON.search(text[max(0, start - 20):start]):
                continue  # "above 120": a threshold, not a value
            by_unit = [n for n, vw in self.vars.items() if vw.unit and re.match(vw.unit, text[end:end + 24], re.I)]
            near = self._near(text, start, end)
            if len(by_unit) == 1:
                name, how = by_unit[0], "unit"
            elif by_unit:
                if near not in by_unit:
                    continue
                name, how = near, "unit and words"
            elif near is not None and re.match(r"\s*(?:[a-z]{1,3}\b)?\s*(?:$|[\s,;.)])", text[end:end + 6], re.I):
                name, how = near, "words"  # a bare number next to the variable's words
            else:
                continue
            out.append((name, x, how))
        return out

    # ------------------------------------------------------------------ the check
    def grounding(self, record: SyntheticRecord, text: str, max_tier: int = 3, language: str = "en") -> tuple[int, int]:
        """(facts of the record the note states, facts it could be seen to state): a numeric value written as
        the record has it, or (in English) a category label of the record that says something on its own
        (not yes/no, normal, a count). A note that states none of them is not about its record."""
        low = text.lower()
        stated = possible = 0
        for name, value in record.values:
            var = self.dictionary[name]
            if value == "" or var.tier > max_tier:
                continue
            if var.type == "numeric":
                try:
                    x = float(value)
                except ValueError:
                    continue
                shown = f"{x:.{var.precision}f}".rstrip("0").rstrip(".") if var.precision else f"{x:.0f}"
                rx = re.escape(shown).replace(r"\.", "[.,]")
                possible += 1
                stated += bool(re.search(r"(?<![\d.,])" + rx + r"(?![\d])", text))
            elif language.lower() in ("en", "english"):
                label = value.replace("_", " ").strip().lower()
                if label in _GENERIC_LABELS or len(label) < 4 or label.isdigit():
                    continue
                possible += 1
                stated += bool(re.search(r"(?<![\w-])" + r"[\s_-]*".join(map(re.escape, label.split())) + r"(?![\w-])", low))
        return stated, possible

    def check(self, record: SyntheticRecord, text: str, max_tier: int = 3, language: str = "en") -> list[str]:
        """What the note says that its record contradicts (empty: nothing found)."""
        d = self.dictionary
        values = record.as_dict()
        problems: list[str] = []
        for name, x, how in self.statements(text):
            var, v = d[name], values.get(name, "")
            if var.tier > max_tier:
                continue
            th = _threshold(var)
            if th is not None:
                op, limit, _ = th
                if v in ("no", "yes") and x != limit:
                    implied = "yes" if (x > limit) == (op == ">") else "no"
                    if implied != v:
                        problems.append(f"{name}: the note states {x:g} ({implied}), the record says {v}")
                continue
            if var.type != "numeric":
                continue
            lo, hi = var.bins[0], var.bins[-1]
            if not lo <= x <= hi:
                continue  # outside the variable's domain: not about it
            if v == "":
                problems.append(f"{name}: the note states {x:g}, the record leaves it unknown")
                continue
            try:
                y = float(v)
            except ValueError:
                continue
            if abs(x - y) > 10 ** -var.precision / 2 and _bin(var, x) != _bin(var, y):
                problems.append(f"{name}: the note states {x:g} (bin {var.bin_label(_bin(var, x))}), the record says {v} "
                                f"(bin {var.bin_label(_bin(var, y))})")
        for label, (name, category) in self.labels.items():
            var = d[name]
            if var.tier > max_tier or values.get(name) == category:
                continue
            for m in self.label_rx[label].finditer(text):
                if _NEGATION.search(text[max(0, m.start() - 40):m.start()]):
                    continue
                own = values.get(name, "")
                problems.append(f"{name}: the note says {label!r}, the record says "
                                f"{own.replace('_', ' ') if own else 'unknown'}")
                break
        for name, var in self.counts.items():
            v = values.get(name, "")
            if var.tier > max_tier or not self.vars[name].keywords:
                continue
            keys = "|".join(map(re.escape, self.vars[name].keywords))
            for m in re.finditer(r"\b(\d+|" + "|".join(_NUMBER_WORDS) + r")\s+(?:[a-z-]+\s+){0,2}(?:" + keys + r")", text, re.I):
                k = m.group(1).lower()
                n = int(k) if k.isdigit() else _NUMBER_WORDS[k]
                if str(n) in var.categories and str(n) != v:
                    problems.append(f"{name}: the note says {n}, the record says {v or 'unknown'}")
                    break
        if self.sex and language.split("-")[0].lower() in ("en", "english") and d[self.sex].tier <= max_tier:
            v = values.get(self.sex, "").lower()
            f, m_ = len(_FEMALE.findall(text)), len(_MALE.findall(text))
            if (v == "male" and f > m_) or (v == "female" and m_ > f):
                problems.append(f"{self.sex}: the note speaks of a {'woman' if f > m_ else 'man'}, the record says {v}")
        return problems


def _bin(var: Variable, x: float) -> int:
    for k in range(len(var.bins) - 1):
        if x < var.bins[k + 1] or k == len(var.bins) - 2:
            return k
    return len(var.bins) - 2


def list_like(text: str) -> bool:
    """A note that is a list of facts rather than prose."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    bullets = sum(bool(re.match(r"([-*•]|\d+[.)])\s", x)) for x in lines)
    colon = sum(bool(re.match(r"[^.:]{3,60}:\s*\S", x)) for x in lines)
    return bullets >= 3 or colon >= 3


_SENTENCE_END = re.compile(r"[.!?](?:[\"')\]]*)(?=\s|$)")


_PREAMBLE = re.compile(r"^[^\n]{0,100}:[ \t]*\n+")


def tidy_note(text: str, cut_off: bool) -> tuple[str, bool, int]:
    """A note without a first line that only introduces it ("Here's a possible clinical narrative:") and the
    quotes around the rest, without the sentences a small model repeats word for word, and (if the reply was
    cut off at max_tokens) without its unfinished last sentence, when a finished one is left. Returns (note,
    whether it was cut back to a sentence end, repeated sentences dropped)."""
    text = text.strip()
    intro = _PREAMBLE.match(text)
    if intro and len(text) - intro.end() >= 40:
        text = text[intro.end():].strip()
        if len(text) > 2 and text[0] in "\"“" and text.count(text[0]) + text.count("”") <= 2:
            text = text.strip("\"“”").strip()
    cut = False
    if cut_off:
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        if ends and ends[-1] < len(text) and ends[-1] >= 20:
            text, cut = text[:ends[-1]], True
    pieces, seen, repeated, start = [], set(), 0, 0
    for m in list(_SENTENCE_END.finditer(text)) + [None]:
        end = m.end() if m else len(text)
        piece = text[start:end]
        key = re.sub(r"\W+", " ", piece).strip().lower()
        if key and key in seen and len(key) > 12:
            repeated += 1
        elif piece.strip():
            pieces.append(piece)
            seen.add(key)
        start = end
    return ("".join(pieces).strip() if repeated else text), cut, repeated


MIN_FACTS_STATED = 2  # a kept note states at least this many of its record's facts (fewer if it has fewer)


def write_notes(client: LLMClient, dictionary: Dictionary, columns: dict[str, list[str]], language: str,
                max_tier: int, guard: PIIGuard, limit: int | None = None,
                progress: Progress | None = None, every: int | None = None) -> tuple[bytes, dict[str, Any]]:
    """notes.jsonl: one note per record (up to limit, within the client's time budget), each conditioned only
    on that record, checked against it and PII-guarded. Progress every `every` notes (default: a tenth)."""
    n = len(next(iter(columns.values()))) if columns else 0
    n = n if limit is None else min(n, limit)
    checker = NoteChecker(dictionary)
    retries = client.config.note_retries

    def one(i):
        record = SyntheticRecord.from_columns(dictionary, columns, i)
        problems: list[str] = []
        text = ""
        try:
            for attempt in range(retries + 1):
                p = note_prompt(dictionary, record, language, max_tier, attempt)
                text, rec = client.text(p, max_tokens=client.config.note_max_tokens)
                text, cut, repeated = tidy_note(text, rec.truncated > 0)
                tidied = (cut, repeated)
                if not text:
                    return None, "empty reply", attempt, problems, tidied
                problems = checker.check(record, text, max_tier, language)
                if not problems:
                    stated, possible = checker.grounding(record, text, max_tier, language)
                    if stated >= min(MIN_FACTS_STATED, possible):
                        return text, "", attempt, [], tidied
                    problems = [f"states {stated} of the record's {possible} recognisable facts (at least "
                                f"{min(MIN_FACTS_STATED, possible)} needed): not about its record"]
            if problems[0].endswith("not about its record"):
                return None, "not about its record", retries, problems, tidied
            return None, "contradicts its record", retries, problems, tidied
        except LLMTimeBudgetError as e:
            return None, f"budget: {e}", 0, problems, (False, 0)
        except (LLMError, ValueError) as e:
            return None, str(e), 0, problems, (False, 0)

    step = every or max(1, min(25, n // 10))
    say = progress or (lambda *a, **k: None)

    def done(k, result):
        if k % step == 0 or k == n:
            _emit(say, f"LLM notes: {k}/{n} records done", done=k, total=n)

    lines, failed, skipped, dropped, regenerated, listy, cut_back, repeats, unrelated = [], 0, 0, 0, 0, 0, 0, 0, 0
    contradictions: list[dict[str, Any]] = []
    for i, (text, err, attempts, problems, (cut, repeated)) in enumerate(client.map(one, range(n), on_done=done)):
        if err.startswith("budget:"):
            skipped += 1
            continue
        regenerated += attempts
        cut_back += cut and text is not None
        repeats += repeated if text is not None else 0
        if text is None:
            failed += 1
            entry: dict[str, Any] = {"record": i, "language": language, "note": None, "error": (err or "empty reply")[:200]}
            if err == "not about its record":
                unrelated += 1
                entry["why"] = problems[0]
            elif problems:
                dropped += 1
                entry["contradictions"] = problems[:5]
                contradictions.append({"record": i, "contradictions": problems[:3]})
            lines.append(entry)
            continue
        listy += list_like(text)
        clean, findings = guard.scrub(text)
        entry = {"record": i, "language": language, "note": clean}
        if findings:
            entry["pii"] = {f.label: sum(1 for g in findings if g.label == f.label) for f in findings}
        lines.append(entry)
    written = n - failed - skipped
    if progress:
        _emit(say, f"LLM notes: {written} of {n} records, in {language}" + (
            f" ({dropped} dropped as contradicting their record)" if dropped else "")
            + (f" ({unrelated} dropped as not about their record)" if unrelated else "")
            + (f"; {skipped} not written: time budget spent" if skipped else ""))
    data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode()
    return data, {"records": n, "notes": written, "failed": failed, "skipped_time_budget": skipped,
                  "dropped_contradicting": dropped, "dropped_unrelated": unrelated, "regenerated": regenerated,
                  "list_like": listy,
                  "cut_to_last_sentence": cut_back, "repeated_sentences_dropped": repeats,
                  "contradictions": contradictions[:10], "language": language,
                  "template": TEMPLATES["note"].id, "max_tier_in_prompt": max_tier,
                  "check": "numbers (by unit or the variable's words) in the record's bin; categories, thresholds and "
                           f"sex consistent with the record; at least {MIN_FACTS_STATED} of the record's facts stated"}


def _emit(progress: Callable[..., None], message: str, **data: Any) -> None:
    """progress(message, **data) where the callback takes data (pipeline events), else progress(message)."""
    try:
        progress(message, **data) if data else progress(message)
    except TypeError:
        progress(message)
