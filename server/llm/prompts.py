"""Prompt builders for the LLM stage: versioned templates over public inputs only.

Privacy invariant by construction: every builder takes the public `Dictionary`, `DPAggregates`
(built only from aggregated DP `Measurement`s), knowledge `Rule`s (themselves built from the
dictionary) and `SyntheticRecord`s (values checked against the dictionary's public domain at
the variable's precision). Anything else - a site's EncodedTable, a numpy array of rows, a
dict of raw values - is refused with a TypeError before a prompt exists. A template's text
changes only with a new version, and every prompt carries a hash of its exact content, so a
release can say which prompts produced it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ...common.dictionary import MISSING, OTHER, OUT_OF_RANGE, Dictionary, Variable
from ..model.graphical import Measurement


def _require(obj: Any, cls: type | tuple[type, ...], what: str) -> None:
    if not isinstance(obj, cls):
        names = cls.__name__ if isinstance(cls, type) else " or ".join(c.__name__ for c in cls)
        raise TypeError(f"{what} must be {names} (prompts see only the public dictionary, DP aggregates and "
                        f"synthetic records), got {type(obj).__name__}")


# ----------------------------------------------------------------------------- public inputs
@dataclass(frozen=True)
class DPMarginal:
    """One aggregated noisy marginal: counts over the dictionary cells of `variables` (row-major)."""

    variables: tuple[str, ...]
    shape: tuple[int, ...]
    counts: tuple[float, ...]
    variance: float

    def probabilities(self) -> np.ndarray:
        """Counts clipped at zero and normalised (uniform if nothing is left), shaped by variables."""
        a = np.clip(np.asarray(self.counts, dtype=float), 0, None)
        a = a / a.sum() if a.sum() > 0 else np.full(a.size, 1.0 / a.size)
        return a.reshape(self.shape)


@dataclass(frozen=True)
class DPAggregates:
    """The DP aggregates a release was fitted to, in a form prompt builders accept."""

    dictionary_hash: str
    marginals: tuple[DPMarginal, ...]

    @classmethod
    def from_measurements(cls, dictionary: Dictionary, measurements: Sequence[Measurement]) -> "DPAggregates":
        """Pooled DP measurements over dictionary variables (others, e.g. per-site axes, and tables over
        compressed domains are left out: prompts speak in dictionary cells); repeated measurements of
        one variable set are combined by inverse-variance weighting."""
        _require(dictionary, Dictionary, "dictionary")
        merged: dict[frozenset[str], tuple[tuple[str, ...], np.ndarray, float]] = {}
        for i, m in enumerate(measurements):
            _require(m, Measurement, f"measurements[{i}]")
            if not all(v in dictionary.variables for v in m.variables) or not m.complete or m.coarse:
                continue
            shape = tuple(dictionary[v].size for v in m.variables)
            values = np.asarray(m.values, dtype=float)
            if values.shape != shape:
                raise ValueError(f"measurement over {m.variables} has shape {values.shape}, the dictionary says {shape}")
            var = float(np.max(np.asarray(m.variance, dtype=float)))
            key = frozenset(m.variables)
            if key in merged:
                order, prev, pvar = merged[key]
                values = np.transpose(values, [m.variables.index(v) for v in order])
                w1, w2 = 1 / pvar, 1 / var
                merged[key] = (order, (w1 * prev + w2 * values) / (w1 + w2), 1 / (w1 + w2))
            else:
                merged[key] = (tuple(m.variables), values, var)
        out = [DPMarginal(order, values.shape, tuple(float(x) for x in values.ravel()), var)
               for order, values, var in merged.values()]
        if not out:
            raise ValueError("no complete DP measurement over dictionary variables")
        return cls(dictionary.hash, tuple(out))

    def find(self, variables: Iterable[str]) -> tuple[DPMarginal, tuple[int, ...]] | None:
        """The first marginal over exactly these variables, and the axis order that puts them in the order given."""
        want = tuple(variables)
        for m in self.marginals:
            if set(m.variables) == set(want) and len(m.variables) == len(want):
                return m, tuple(m.variables.index(v) for v in want)
        return None

    def probabilities(self, variables: Sequence[str]) -> np.ndarray | None:
        found = self.find(variables)
        if found is None:
            return None
        m, perm = found
        return np.transpose(m.probabilities(), perm)

    def covering(self, variables: Iterable[str]) -> tuple[DPMarginal, np.ndarray] | None:
        """A measured marginal whose variables include all of `variables` (the smallest such), with probabilities."""
        want = set(variables)
        cands = [m for m in self.marginals if want <= set(m.variables)]
        if not cands:
            return None
        m = min(cands, key=lambda m: math.prod(m.shape))
        return m, m.probabilities()

    @property
    def total(self) -> float:
        """Inverse-variance weighted estimate of the number of records (as the model does)."""
        w = np.array([1.0 / (m.variance * len(m.counts)) for m in self.marginals])
        s = np.array([sum(m.counts) for m in self.marginals])
        return max(1.0, float((w * s).sum() / w.sum()))


@dataclass(frozen=True)
class SyntheticRecord:
    """One synthetic record in the dictionary's vocabulary; every value is checked against the domain."""

    values: tuple[tuple[str, str], ...]

    @classmethod
    def from_values(cls, dictionary: Dictionary, values: Mapping[str, str]) -> "SyntheticRecord":
        _require(dictionary, Dictionary, "dictionary")
        out = []
        for name, var in dictionary.variables.items():
            v = values.get(name, "")
            if not isinstance(v, str) or not in_domain(var, v):
                raise ValueError(f"synthetic record: {name} = {v!r} is not in the dictionary's domain")
            out.append((name, v))
        return cls(tuple(out))

    @classmethod
    def from_columns(cls, dictionary: Dictionary, columns: Mapping[str, Sequence[str]], i: int) -> "SyntheticRecord":
        return cls.from_values(dictionary, {n: columns[n][i] for n in dictionary.names})

    def as_dict(self) -> dict[str, str]:
        return dict(self.values)


def in_domain(var: Variable, value: str) -> bool:
    """Is a record value one the dictionary allows ("" = missing, a category, or a number at the precision)?"""
    if value == "":
        return var.missing
    if var.type == "categorical":
        return value in var.categories or (var.other and value == OTHER)
    if value == OUT_OF_RANGE:
        return var.out_of_range == "cell"
    try:
        x = float(value)
    except ValueError:
        return False
    return (math.isfinite(x) and var.bins[0] <= x <= var.bins[-1]
            and value == f"{x:.{var.precision}f}")


@dataclass(frozen=True)
class Condition:
    """One clause of a rule: `variable op values` (in / not_in) or `variable op value` (<, <=, >, >=)."""

    variable: str
    op: str
    values: tuple[str, ...] = ()
    value: float | None = None

    def text(self) -> str:
        if self.op in ("in", "not_in"):
            return f"{self.variable} {'in' if self.op == 'in' else 'not in'} {{{', '.join(self.values)}}}"
        return f"{self.variable} {self.op} {self.value:g}"


@dataclass(frozen=True)
class Rule:
    """An impossible combination: no record may satisfy all conditions; `repair` names the variable to change."""

    description: str
    conditions: tuple[Condition, ...]
    repair: str

    def text(self) -> str:
        return " AND ".join(c.text() for c in self.conditions)


# ----------------------------------------------------------------------------- templates and prompts
@dataclass(frozen=True)
class Template:
    name: str
    version: str
    system: str

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"


_SAFETY = ("Everything you write is synthetic. Never write names of people, places, hospitals or institutions, "
           "addresses, phone numbers, e-mail addresses, dates or identification numbers.")

TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("knowledge", "2",
             "You are a clinical data scientist. From a data dictionary alone (variable names, descriptions, units "
             "and value domains; no data), state (1) which groups of 2 or 3 variables are clinically dependent and "
             "matter most for realistic synthetic records, most important first, and (2) which value combinations are "
             "impossible in real patients (for example pregnancy with male sex, values outside the population a unit "
             "serves). A rule lists conditions that can never all hold at once; comparisons use the variable's unit; "
             "'repair' names the variable that should be changed when a record breaks the rule. Propose only rules "
             "that are certain, not merely unlikely. Keep every text short. " + _SAFETY),
    Template("generate-definition", "2",
             "You generate synthetic patient records for a research consortium. Follow the data dictionary's "
             "definitions and value domains exactly and match the given differentially private population "
             "percentages as a whole batch. Records must be clinically coherent and differ from each other. " + _SAFETY),
    Template("generate-example", "2",
             "You generate synthetic patient records for a research consortium. Write new records that look like "
             "the example records (themselves synthetic) in distribution and clinical coherence, using only the "
             "dictionary's value domains. Never repeat an example record: every record you write must differ from "
             "each example in several values. " + _SAFETY),
    Template("generate-rule", "2",
             "You generate synthetic patient records for a research consortium. Obey every rule given: the value "
             "domains, the differentially private percentages and conditional percentages, and the impossible "
             "combinations. Records must be clinically coherent and differ from each other. " + _SAFETY),
    Template("note", "2",
             "You are a clinician writing a short clinical narrative (2 to 4 sentences of prose, as in a clinic "
             "letter) about one synthetic patient. Weave the facts given into sentences that connect them clinically; "
             "do not write a list, headings or bullet points, and do not repeat the facts one by one. Use only the facts "
             "given: when you state a value, state exactly the value given; leave out facts marked unknown; do not add "
             "findings, diagnoses, measurements or history that the facts do not state. Do not write raw variable "
             "names. " + _SAFETY),
    Template("probe", "1", "You answer with exactly what is asked."),
)}
STYLES = {"definition": "generate-definition", "example": "generate-example", "rule": "generate-rule"}

LANGUAGES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "nl": "Dutch",
             "pt": "Portuguese", "hu": "Hungarian", "pl": "Polish", "sv": "Swedish", "da": "Danish"}


@dataclass(frozen=True)
class Prompt:
    """A chat prompt from one template, optionally with a JSON Schema the reply must satisfy."""

    template: Template
    messages: tuple[tuple[str, str], ...]
    schema_json: str | None = None
    schema_name: str = ""
    seed_offset: int = 0
    meta: tuple[tuple[str, Any], ...] = field(default=())
    schema_hint: str | None = None  # the reply's shape in a few lines, sent instead of the schema in prompt mode
    # the schema as a grammar-constrained server (llama-cpp-python's json_object + schema) is sent it: the same
    # shape with numeric ranges spelled out as enums, because its grammar converter ignores minimum/maximum
    grammar_schema_json: str | None = None

    @property
    def schema(self) -> dict | None:
        return None if self.schema_json is None else json.loads(self.schema_json)

    @property
    def grammar_schema(self) -> dict | None:
        """The schema for a server that turns it into a grammar (numeric ranges enumerated where small)."""
        return json.loads(self.grammar_schema_json) if self.grammar_schema_json is not None else self.schema

    @property
    def hash(self) -> str:
        content = {"template": self.template.id, "messages": self.messages, "schema": self.schema_json,
                   "schema_name": self.schema_name, "seed_offset": self.seed_offset}
        if self.schema_hint is not None:
            content["schema_hint"] = self.schema_hint
        if self.grammar_schema_json is not None:
            content["grammar_schema"] = self.grammar_schema_json
        return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.meta)

    def chat_messages(self, schema_in_prompt: bool) -> list[dict[str, str]]:
        """OpenAI chat messages; with schema_in_prompt the reply's shape is spelled out in the system message
        (for servers without `response_format` JSON-Schema support): the schema hint if the prompt has one
        (a few lines, for small contexts), else the JSON Schema."""
        msgs = [{"role": r, "content": c} for r, c in self.messages]
        if schema_in_prompt and self.schema_json is not None:
            if self.schema_hint is not None:
                extra = (f"\n\nReply with one JSON object only, no other text, shaped like this (named "
                         f"{self.schema_name}):\n```\n{self.schema_hint}\n```")
            else:
                extra = (f"\n\nReply with one JSON object only, no other text. It must validate against this JSON "
                         f"Schema (named {self.schema_name}):\n```json\n{self.schema_json}\n```")
            msgs[0] = {"role": "system", "content": msgs[0]["content"] + extra}
        return msgs


def _prompt(name: str, user: str, schema: dict | None = None, schema_name: str = "", seed_offset: int = 0,
            hint: str | None = None, grammar_schema: dict | None = None, **meta: Any) -> Prompt:
    t = TEMPLATES[name]
    dump = (lambda x: None if x is None else json.dumps(x, sort_keys=True, separators=(",", ":")))
    return Prompt(t, (("system", t.system), ("user", user)), dump(schema), schema_name, seed_offset,
                  tuple(sorted(meta.items())), hint, dump(grammar_schema if grammar_schema != schema else None))


class PromptTooLong(ValueError):
    """Even the shortest form of a prompt exceeds the tokens available for it."""

    def __init__(self, message: str, needed: int, available: int):
        super().__init__(message)
        self.needed, self.available = needed, available


def rough_tokens(text: str) -> int:
    """A conservative token estimate when nothing better is known (3 characters a token)."""
    return -(-len(text) // 3)


# ----------------------------------------------------------------------------- rendering public inputs
def _num(x: float) -> str:
    return f"{x:g}"


def describe_variable(var: Variable, compact: bool = False) -> str:
    if var.type == "categorical":
        dom = "one of: " + ", ".join(var.categories) + (f", {OTHER}" if var.other else "")
    else:
        dom = (f"number in [{_num(var.bins[0])}, {_num(var.bins[-1])}] with {var.precision} decimal(s)"
               + (f", or {OUT_OF_RANGE}" if var.out_of_range == "cell" else ""))
    unit = f", unit {var.unit}" if var.unit else ""
    miss = '; "" if unknown' if var.missing else "; never missing"
    if compact:  # the description cut to its first clause
        desc = (var.description or var.name).split(",")[0].split("(")[0].split(":")[0].strip()[:48]
        return f"- {var.name} ({var.type}{unit}): {desc}. Value: {dom}{miss}."
    return f"- {var.name} ({var.type}{unit}): {var.description or var.name}. Value: {dom}{miss}."


def describe_dictionary(dictionary: Dictionary, max_tier: int = 3, compact: bool = False) -> str:
    _require(dictionary, Dictionary, "dictionary")
    lines = [f"Data dictionary {dictionary.name} {dictionary.version}:"]
    lines += [describe_variable(v, compact) for v in dictionary.variables.values() if v.tier <= max_tier]
    return "\n".join(lines)


def _cell_label(var: Variable, cell: str) -> str:
    return '"" (unknown)' if cell == MISSING else cell


def _pct(p: float) -> str:
    return f"{100 * p:.1f}%" if p < 0.1 else f"{100 * p:.0f}%"


MARGINALS_HEADER = "Population percentages (differentially private estimates; numeric variables by range):"
CONDITIONALS_HEADER = "Conditional percentages (differentially private estimates):"


def marginal_lines(dictionary: Dictionary, aggregates: DPAggregates) -> list[str]:
    _require(aggregates, DPAggregates, "aggregates")
    if aggregates.dictionary_hash != dictionary.hash:
        raise ValueError("the DP aggregates are for another dictionary")
    lines = []
    for name, var in dictionary.variables.items():
        p = aggregates.probabilities((name,))
        if p is None:
            continue
        lines.append(f"- {name}: " + ", ".join(f"{_cell_label(var, c)} {_pct(q)}" for c, q in zip(var.cells, p) if q >= 0.0005))
    return lines


def describe_marginals(dictionary: Dictionary, aggregates: DPAggregates) -> str:
    return "\n".join([MARGINALS_HEADER] + marginal_lines(dictionary, aggregates))


def conditional_lines(dictionary: Dictionary, aggregates: DPAggregates) -> list[str]:
    """Conditional percentages P(b | a) from every 2-way DP marginal (a: the variable with fewer cells),
    most informative first: marginals by mutual information, rows by their mass."""
    _require(aggregates, DPAggregates, "aggregates")
    ranked = []
    for m in aggregates.marginals:
        if len(m.variables) != 2:
            continue
        a, b = sorted(m.variables, key=lambda v: (dictionary[v].size, m.variables.index(v)))
        joint = aggregates.probabilities((a, b))
        pa, pb = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            mi = float(np.nansum(np.where(joint > 0, joint * np.log(joint / (pa * pb)), 0.0)))
        va, vb = dictionary[a], dictionary[b]
        for i, ca in enumerate(va.cells):
            row = joint[i]
            if row.sum() < 0.01:
                continue
            cond = row / row.sum()
            line = (f"- {b} given {a} = {_cell_label(va, ca)}: "
                    + ", ".join(f"{_cell_label(vb, c)} {_pct(q)}" for c, q in zip(vb.cells, cond) if q >= 0.005))
            ranked.append((-mi, -float(row.sum()), line))
    return [line for *_, line in sorted(ranked)]


def describe_conditionals(dictionary: Dictionary, aggregates: DPAggregates) -> str:
    return "\n".join([CONDITIONALS_HEADER] + conditional_lines(dictionary, aggregates))


# ----------------------------------------------------------------------------- schemas
def knowledge_schema(dictionary: Dictionary, max_items: int = 40) -> dict:
    names = dictionary.names
    return {"type": "object", "additionalProperties": False, "required": ["dependencies", "rules"], "properties": {
        "dependencies": {"type": "array", "maxItems": max_items, "items": {
            "type": "object", "additionalProperties": False, "required": ["variables", "reason"], "properties": {
                "variables": {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "string", "enum": names}},
                "reason": {"type": "string", "maxLength": 300}}}},
        "rules": {"type": "array", "maxItems": max_items, "items": {
            "type": "object", "additionalProperties": False, "required": ["description", "conditions", "repair"],
            "properties": {
                "description": {"type": "string", "maxLength": 300},
                "conditions": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                    "type": "object", "additionalProperties": False, "required": ["variable", "op", "values", "value"],
                    "properties": {
                        "variable": {"type": "string", "enum": names},
                        "op": {"type": "string", "enum": ["in", "not_in", "<", "<=", ">", ">="]},
                        "values": {"type": "array", "maxItems": 20, "items": {"type": "string"}},
                        "value": {"type": ["number", "null"]}}}},
                "repair": {"type": "string", "enum": names}}}}}}


KNOWLEDGE_HINT = (
    '{"dependencies": [{"variables": ["<variable>", "<variable>"], "reason": "<short reason>"}, ...],\n'
    ' "rules": [{"description": "<short>", "conditions": [{"variable": "<variable>", '
    '"op": "in" | "not_in" | "<" | "<=" | ">" | ">=", "values": ["<category>", ...], "value": <number or null>}, ...], '
    '"repair": "<variable>"}, ...]}\n'
    "variables by their dictionary names; \"values\" for in/not_in (else []), \"value\" for comparisons (else null).")


GRAMMAR_ENUM_MAX = 1000  # numeric variables with at most this many values at their precision are enumerated


def numeric_grid(var: Variable, limit: int = GRAMMAR_ENUM_MAX) -> list[int | float] | None:
    """Every value a numeric variable can take at its precision, in order (None if more than `limit`)."""
    if var.type != "numeric" or not var.bins:
        return None
    scale = 10 ** var.precision
    lo, hi = math.ceil(var.bins[0] * scale - 1e-9), math.floor(var.bins[-1] * scale + 1e-9)
    if hi < lo or hi - lo + 1 > limit:
        return None
    return [k if var.precision == 0 else round(k / scale, var.precision) for k in range(lo, hi + 1)]


def value_schema(var: Variable, grammar: bool = False) -> dict:
    """A value's JSON Schema. grammar=True: for servers that compile the schema into a grammar without
    honouring minimum/maximum (llama-cpp-python), numbers are listed as an enum where the grid is small,
    so even a small model cannot write a number outside the domain or at another precision."""
    if var.type == "categorical":
        return {"type": "string", "enum": list(var.categories) + ([OTHER] if var.other else []) + ([""] if var.missing else [])}
    grid = numeric_grid(var) if grammar else None
    if grid is not None:
        return {"enum": grid + ([None] if var.missing else [])}
    s = {"type": ["number", "null"] if var.missing else "number", "minimum": var.bins[0], "maximum": var.bins[-1]}
    return s


def records_schema(dictionary: Dictionary, n: int, grammar: bool = False) -> dict:
    """The reply of a generation batch: exactly n records (grammar=True: see value_schema)."""
    item = {"type": "object", "additionalProperties": False, "required": dictionary.names,
            "properties": {name: value_schema(v, grammar) for name, v in dictionary.variables.items()}}
    return {"type": "object", "additionalProperties": False, "required": ["records"],
            "properties": {"records": {"type": "array", "minItems": n, "maxItems": n, "items": item}}}


def records_hint(dictionary: Dictionary, n: int) -> str:
    """The shape of a records reply in a few lines: one record's fields with their JSON types."""
    fields = []
    for name, var in dictionary.variables.items():
        if var.type == "numeric":
            t = "number" + (" or null" if var.missing else "")
        elif len(var.categories) <= 4 and sum(map(len, var.categories)) <= 40:
            t = " | ".join(f'"{c}"' for c in var.categories) + (' | ""' if var.missing else "")
        else:
            t = "<category>" + (' or ""' if var.missing else "")
        fields.append(f'"{name}": {t}')
    return '{"records": [{' + ", ".join(fields) + f"}}, ... exactly {n} records]}}"


# ----------------------------------------------------------------------------- builders
def _fit(required: Sequence[str], groups: Sequence[tuple[str, str, Sequence[str], int]], budget: int | None,
         tokens: Callable[[str], int]) -> tuple[list[str], dict[str, int]]:
    """Parts of a prompt within `budget` tokens: every required part, then each group (key, header,
    lines, fewest lines) in order, as many of its lines (in their order of priority) as fit.
    Returns the parts and, per group, how many lines were left out."""
    used = sum(tokens(p) + 1 for p in required)
    if budget is not None and used > budget:
        raise PromptTooLong(f"the prompt needs about {used} tokens, {budget} are available", used, budget)
    parts, dropped = list(required[:-1]), {}
    for key, header, lines, least in groups:
        if not lines:
            continue
        take, cost = [], tokens(header) + 2
        for line in lines:
            c = tokens(line) + 1
            if budget is not None and used + cost + c > budget:
                continue
            take.append(line)
            cost += c
        if len(take) < least:
            need = used + tokens(header) + sum(tokens(x) + 1 for x in lines[:least]) + 2
            raise PromptTooLong(f"the prompt needs about {need} tokens with its {key}, {budget} are available", need, budget or 0)
        if take:
            keep = set(take)
            parts.append("\n".join([header] + [x for x in lines if x in keep]))  # kept lines in their order
            used += cost
        if len(take) < len(lines):
            dropped[key] = len(lines) - len(take)
    parts.append(required[-1])
    return parts, dropped


def knowledge_prompt(dictionary: Dictionary, max_items: int = 40, budget: int | None = None,
                     tokens: Callable[[str], int] = rough_tokens) -> Prompt:
    """Clinical knowledge from the dictionary alone (costs no privacy budget). `budget`: tokens available
    for the user message (the dictionary is shortened if it does not fit)."""
    ask = (f"Propose the clinically important dependencies (pairs or triples) and the impossible combinations as JSON: "
           f"at most {max_items} dependencies and at most {max_items} rules, most important first.")
    desc = describe_dictionary(dictionary)
    compact = budget is not None and tokens(desc) + tokens(ask) + 4 > budget
    if compact:
        desc = describe_dictionary(dictionary, compact=True)
    parts, _ = _fit([desc, ask], [], budget, tokens)
    return _prompt("knowledge", "\n\n".join(parts), knowledge_schema(dictionary, max_items), "knowledge",
                   hint=KNOWLEDGE_HINT, max_items=max_items, compact_dictionary=compact)


def generation_prompt(style: str, dictionary: Dictionary, aggregates: DPAggregates, n: int, batch: int,
                      examples: Sequence[SyntheticRecord] = (), rules: Sequence[Rule] = (), budget: int | None = None,
                      tokens: Callable[[str], int] = rough_tokens) -> Prompt:
    """A batch of n records in one of the prompt styles: definition, example or rule.

    `budget`: tokens available for the user message. What does not fit is left out by priority
    (conditional percentages least informative first, then rules and examples from the end; the
    dictionary is shortened); the prompt's `info["dropped"]` says how many lines of each. A prompt
    whose essentials do not fit raises PromptTooLong."""
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose from {sorted(STYLES)}")
    _require(dictionary, Dictionary, "dictionary")
    _require(aggregates, DPAggregates, "aggregates")
    for i, r in enumerate(examples):
        _require(r, SyntheticRecord, f"examples[{i}]")
    for i, r in enumerate(rules):
        _require(r, Rule, f"rules[{i}]")
    if style == "example" and not examples:
        raise ValueError("the example style needs synthetic example records")
    ask = (f"Batch {batch}: generate {n} new records as JSON "
           '{"records": [...]}, each with every variable; numbers as JSON numbers, unknown values as "" or null.')
    groups: list[tuple[str, str, Sequence[str], int]] = []
    if style == "example":
        shown = [json.dumps(_typed(dictionary, r.as_dict()), ensure_ascii=False) for r in examples]
        groups.append(("examples", "Example records (synthetic; do not copy them):", shown, 1))
    else:
        groups.append(("marginals", MARGINALS_HEADER, marginal_lines(dictionary, aggregates), 1))
    if style == "rule":
        groups.append(("conditionals", CONDITIONALS_HEADER, conditional_lines(dictionary, aggregates), 0))
        if rules:
            groups.append(("rules", "Impossible combinations (never generate them):",
                           [f"- {r.text()}: {r.description}" for r in rules], 0))
    desc = describe_dictionary(dictionary)
    compact = False
    if budget is not None:
        least = sum(tokens(h) + sum(tokens(x) + 1 for x in lines[:k]) + 2 for _, h, lines, k in groups)
        if tokens(desc) + tokens(ask) + least + 4 > budget:
            desc, compact = describe_dictionary(dictionary, compact=True), True
    parts, dropped = _fit([desc, ask], groups, budget, tokens)
    kept_examples = ()
    if style == "example":
        kept = parts[1].splitlines()[1:]
        kept_examples = tuple(kept)
    return _prompt(STYLES[style], "\n\n".join(parts), records_schema(dictionary, n), "records", seed_offset=batch,
                   hint=records_hint(dictionary, n), grammar_schema=records_schema(dictionary, n, grammar=True),
                   style=style, batch=batch, n=n, dropped=tuple(sorted(dropped.items())),
                   compact_dictionary=compact, examples_shown=kept_examples)


def _typed(dictionary: Dictionary, values: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, v in values.items():
        var = dictionary[name]
        out[name] = (float(v) if var.precision else int(float(v))) if var.type == "numeric" and v not in ("", OUT_OF_RANGE) else v
    return out


def note_facts(dictionary: Dictionary, record: SyntheticRecord, max_tier: int = 2) -> list[tuple[str, str, str]]:
    """(variable, description, value as shown) of the record's facts a note may use."""
    facts = []
    for name, value in record.values:
        var = dictionary[name]
        if var.tier > max_tier:
            continue
        shown = "unknown" if value == "" else (f"{value} {var.unit}".strip() if var.type == "numeric" else value.replace("_", " "))
        facts.append((name, var.description or name, shown))
    return facts


def note_prompt(dictionary: Dictionary, record: SyntheticRecord, language: str, max_tier: int = 2,
                attempt: int = 0) -> Prompt:
    """One short narrative note conditioned only on this synthetic record (variables above max_tier left
    out). `attempt` > 0: a new draw (another seed) after a note that contradicted its record."""
    _require(dictionary, Dictionary, "dictionary")
    _require(record, SyntheticRecord, "record")
    lang = LANGUAGES.get(language, language)
    facts = [f"- {desc}: {shown}" for _, desc, shown in note_facts(dictionary, record, max_tier)]
    user = (f"Write the note in {lang}, as 2 to 4 sentences of connected prose (no list).\n"
            "Facts about the patient:\n" + "\n".join(facts))
    return _prompt("note", user, seed_offset=attempt * 104729)


def probe_prompt() -> Prompt:
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
              "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}}}
    return _prompt("probe", 'Return {"ok": true, "n": 3}.', schema, "probe")


# ----------------------------------------------------------------------------- JSON Schema (the subset used above)
def validate_schema(instance: Any, schema: Mapping[str, Any], path: str = "$") -> None:
    """Validate against the JSON-Schema subset these prompts use; raise ValueError naming the path."""
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not any(_is_type(instance, x) for x in types):
            raise ValueError(f"{path}: expected {' or '.join(types)}, got {type(instance).__name__}")
    if "enum" in schema and instance not in schema["enum"]:
        raise ValueError(f"{path}: {instance!r} is not one of {schema['enum'][:12]}")
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        if "minimum" in schema and instance < schema["minimum"]:
            raise ValueError(f"{path}: {instance} < minimum {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            raise ValueError(f"{path}: {instance} > maximum {schema['maximum']}")
    if isinstance(instance, str) and "maxLength" in schema and len(instance) > schema["maxLength"]:
        raise ValueError(f"{path}: longer than {schema['maxLength']} characters")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0) or len(instance) > schema.get("maxItems", math.inf):
            raise ValueError(f"{path}: {len(instance)} items, expected {schema.get('minItems', 0)}-{schema.get('maxItems', 'any')}")
        if "items" in schema:
            for i, x in enumerate(instance):
                validate_schema(x, schema["items"], f"{path}[{i}]")
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            if k not in instance:
                raise ValueError(f"{path}: missing required property {k!r}")
        if schema.get("additionalProperties") is False:
            extra = set(instance) - set(props)
            if extra:
                raise ValueError(f"{path}: unexpected properties {sorted(extra)[:5]}")
        for k, sub in props.items():
            if k in instance:
                validate_schema(instance[k], sub, f"{path}.{k}")


def _is_type(x: Any, t: str) -> bool:
    return {"object": isinstance(x, dict), "array": isinstance(x, list), "string": isinstance(x, str),
            "boolean": isinstance(x, bool), "null": x is None,
            "integer": isinstance(x, int) and not isinstance(x, bool),
            "number": isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)}.get(t, False)
