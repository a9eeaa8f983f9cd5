"""Clinical knowledge from the public dictionary alone (zero privacy budget).

The LLM proposes clinically important dependencies (the planner may measure them:
`knowledge_dependencies`) and impossible value combinations. Rules are validated against the
dictionary, checked against the DP aggregates where a measured marginal covers them (a rule the
DP data contradict is rejected), stored in llm_rules.json, and used to repair sampled records.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ...common.dictionary import MISSING, OTHER, OUT_OF_RANGE, Dictionary, Variable
from ..model.graphical import JunctionTree
from .client import EndpointMemory, LLMClient, LLMConfig, LLMContextError, LLMError
from .pii import PIIGuard
from .prompts import Condition, DPAggregates, Prompt, PromptTooLong, Rule, knowledge_prompt

Progress = Callable[[str], None]
MAX_RULE_MASS = 0.03  # an "impossible" combination holding this share of the DP records is contradicted by data


@dataclass
class Knowledge:
    dependencies: list[tuple[str, ...]]
    rules: list[Rule]
    report: dict[str, Any]


def norm_label(s: str) -> str:
    return re.sub(r"[\s\-/]+", "_", str(s).strip().lower())


def match_category(var: Variable, value: Any) -> str | None:
    """A category of var for an LLM-written value: exact, or equal after case/space/hyphen normalisation."""
    if isinstance(value, bool):
        value = "yes" if value else "no"
    s = str(value)
    cats = list(var.categories) + ([OTHER] if var.other else [])
    if s in cats:
        return s
    by_norm = {norm_label(c): c for c in cats}
    return by_norm.get(norm_label(s))


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
                        m = match_category(var, v)
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


ITEM_TOKENS = 60  # a dependency or a rule, in a reply


def _knowledge_request(client: LLMClient, dictionary: Dictionary) -> tuple[Prompt, int | None]:
    """The knowledge prompt sized to the endpoint: as many items as its context and the time left
    leave room for (2 to 40 of each), the dictionary shortened if needed; and the reply's max_tokens."""
    if not client.context:
        prompt = knowledge_prompt(dictionary)
        afford = client.affordable_tokens(client.prompt_tokens(prompt))
        if afford is None:
            return prompt, None
        items = int(min(40, max(2, (afford - 40) // (2 * ITEM_TOKENS))))
        return knowledge_prompt(dictionary, items), min(client.config.max_tokens, max(afford, 2 * ITEM_TOKENS * items + 40))
    try:
        return _sized_knowledge_request(client, dictionary)
    except PromptTooLong as e:
        raise LLMContextError(f"knowledge: the dictionary does not fit the endpoint's context of {client.context} tokens "
                              f"({e}); not sent", client.context, e.needed) from None


def _sized_knowledge_request(client: LLMClient, dictionary: Dictionary) -> tuple[Prompt, int | None]:
    probe = knowledge_prompt(dictionary, 8, None, client.tokens)
    prompt_tokens = client.prompt_tokens(probe)
    room = client.context - prompt_tokens - 48
    if room < 4 * ITEM_TOKENS:  # shorten the dictionary first
        probe = knowledge_prompt(dictionary, 8, client.context // 2, client.tokens)
        prompt_tokens = client.prompt_tokens(probe)
        room = client.context - prompt_tokens - 48
    afford = client.affordable_tokens(prompt_tokens)
    if afford is not None:
        room = min(room, max(afford, 2 * 2 * ITEM_TOKENS + 40))
    items = int(min(40, max(2, (room - 40) // (2 * ITEM_TOKENS))))
    budget = client.context - 48 - (prompt_tokens - client.message_tokens(probe.chat_messages(False)[1:])) - 2 * ITEM_TOKENS * items
    prompt = knowledge_prompt(dictionary, items, max(budget, 0), client.tokens)
    return prompt, min(client.config.max_tokens, max(room, 64))


def ask_knowledge(client: LLMClient, dictionary: Dictionary) -> tuple[Any, Prompt]:
    """The LLM's raw proposal and the prompt that got it. A prompt the server finds too long for its
    context is asked again once, sized to the context the answer names (or half as many items)."""
    for attempt in range(2):
        prompt, max_tokens = _knowledge_request(client, dictionary)
        try:
            obj, _ = client.json(prompt, validate=_knowledge_shape, max_tokens=max_tokens)
            return obj, prompt
        except LLMContextError:
            if attempt or not client.context:
                raise
    raise AssertionError("unreachable")


def propose_knowledge(client: LLMClient, dictionary: Dictionary, aggregates: DPAggregates | None,
                      guard: PIIGuard | None = None) -> Knowledge:
    """Ask for dependencies and impossible combinations; keep what the dictionary and DP aggregates allow."""
    obj, prompt = ask_knowledge(client, dictionary)  # item by item checks below: one bad rule spoils nothing
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
                           max_clique_cells: int = 100_000, memory: EndpointMemory | None = None,
                           time_budget: float | None = None) -> list[tuple[str, ...]]:
    """Dependencies the LLM proposes from the dictionary alone (no privacy cost), for the planner's `extra`.

    In the LLM's order of importance, keeping only those that leave the model's junction tree
    (with the dictionary's declared dependencies) within max_clique_cells per clique. Offline or
    on any LLM failure: [] (the planner then uses the dictionary's structure alone). `memory`: what
    the release learns about the endpoint (shared with its LLM stage); `time_budget`: seconds this
    call may take.
    """
    say = progress or (lambda m: None)
    if not config.enabled:
        return []
    try:
        client = LLMClient(config, memory=memory)
        client.set_deadline(time_budget)
        knowledge = propose_knowledge(client, dictionary, None)
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
    """Both lists, or one of them from a reply cut off mid-way (salvaged: the other is taken as empty)."""
    if isinstance(obj, dict) and any(isinstance(obj.get(k), list) for k in ("dependencies", "rules")):
        for k in ("dependencies", "rules"):
            obj.setdefault(k, [])
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


