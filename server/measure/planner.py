"""Query plans: which marginals every site measures, and with how much of the release's rho.

Two strategies, both spending exactly the per-site rho of the release:

- ``dictionary``: all 1-way marginals plus the 2-/3-way marginals of a structure known before
  any data is seen (the dictionary's declared dependencies, the LLM's clinical prior, or a chain
  if nothing is declared). No budget goes to structure selection.
- ``adaptive`` (in the spirit of MST and AIM): round 1 spends a fraction of rho on all 1-way
  and 2-way marginals as cheap candidates; the coordinator sums them, picks a maximum spanning
  tree of noise-corrected pairwise dependence and adds strong further pairs within a model-size
  budget; round 2 spends the rest on the chosen pairs and the 1-way tables again. Every
  measurement inside the chosen structure feeds the estimator.

Domain compression (default, ``compressed_plan``): the joint tables are measured in a second
round over cells grouped by the first round's noisy 1-way counts, so that at a small budget a
declared pair like age x chol (99 cells) becomes a table whose cells hold more signal than noise.
Without it the ``dictionary`` strategy is a single round over full domains.

Within a round rho is split in proportion to cells^(2/3), which minimises the sum of the
marginals' expected L1 errors (error of a table ~ cells * sigma, sigma ~ rho^(-1/2)); 1-way
tables weigh ONE_WAY_WEIGHT times more, since every clique and the record total lean on them
(3 was best of 1/2/3/5 on the demo benchmark at epsilon 1 and 4, see docs/benchmarks.md).
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ...common import accounting, keys
from ...common.dictionary import Dictionary, Variable
from ...protos import guard_pb2 as pb
from ..model.graphical import Measurement, estimate_total, max_spanning_tree

STRATEGIES = ("dictionary", "adaptive")
ONE_WAY_WEIGHT = 3.0


@dataclass(frozen=True)
class PlannedMarginal:
    variables: tuple[str, ...]
    rho: float
    groups: tuple[tuple[int, ...] | None, ...] | None = None  # domain compression (common/cells.py)

    def cells(self, dictionary: Dictionary) -> int:
        return math.prod(dictionary[v].size if not self.groups or self.groups[k] is None else max(self.groups[k]) + 1
                         for k, v in enumerate(self.variables))


def structure(dictionary: Dictionary, extra: Sequence[Sequence[str]] = ()) -> list[tuple[str, ...]]:
    """Cliques beyond 1-way known without data: declared dependencies (+ extra), else a chain."""
    sets = [tuple(d) for d in dictionary.dependencies] + [tuple(e) for e in extra]
    if not sets:
        names = dictionary.names
        sets = [(a, b) for a, b in zip(names, names[1:])]
    return list(dict.fromkeys(sets))


def allocate(dictionary: Dictionary, sets: Sequence[tuple[str, ...] | PlannedMarginal], rho: float) -> list[PlannedMarginal]:
    """Split rho over `sets` in proportion to cells^(2/3) (1-way tables: ONE_WAY_WEIGHT times that).

    A set may be a PlannedMarginal whose groups (domain compression) are kept and counted."""
    if not (rho > 0 and math.isfinite(rho)):
        raise ValueError(f"rho per site must be a positive finite number, got {rho!r}")
    planned = [s if isinstance(s, PlannedMarginal) else PlannedMarginal(tuple(s), 0.0) for s in sets]
    weights = [(ONE_WAY_WEIGHT if len(p.variables) == 1 else 1.0) * p.cells(dictionary) ** (2 / 3) for p in planned]
    total = sum(weights)
    return [PlannedMarginal(p.variables, rho * w / total, p.groups) for p, w in zip(planned, weights)]


def one_round_plan(dictionary: Dictionary, rho: float, extra: Sequence[Sequence[str]] = ()) -> list[PlannedMarginal]:
    """All 1-way marginals plus the known structure's marginals."""
    return allocate(dictionary, [(n,) for n in dictionary.names] + structure(dictionary, extra), rho)


def candidate_plan(dictionary: Dictionary, rho: float) -> list[PlannedMarginal]:
    """Round 1 of the adaptive strategy: every 1-way and 2-way marginal."""
    names = dictionary.names
    return allocate(dictionary, [(n,) for n in names] + list(itertools.combinations(names, 2)), rho)


def dependence(m: Measurement) -> float:
    """Noise-corrected L1 distance of a summed 2-way table from the product of its own margins."""
    y = np.clip(m.values, 0, None)
    n = y.sum()
    if n <= 0:
        return 0.0
    indep = np.outer(y.sum(axis=1), y.sum(axis=0)) / n
    noise = m.values.size * math.sqrt(2 * float(np.max(m.variance)) / math.pi)  # E|noise| summed over cells
    return float(np.abs(y - indep).sum() - noise)


def dependence_sd(m: Measurement) -> float:
    """Standard deviation of the summed |noise| that `dependence` subtracts (pure noise's spread)."""
    return math.sqrt(m.values.size * float(np.max(m.variance)) * (1 - 2 / math.pi))


EXTRA_SIGMAS = 3.0  # an extra pair's dependence must clear its noise by this many standard deviations
EXTRA_MIN_TVD = 0.01  # ... and move the pair at least this far (TVD) from independence
EXTRA_CLIQUE_CELLS = 50_000  # extra pairs may grow the model's largest clique up to this size


def select_tree(names: Sequence[str], pairs: dict[tuple[str, str], float]) -> list[tuple[str, str]]:
    """Maximum spanning tree over `names` by pair score."""
    return max_spanning_tree(names, pairs)


def selected_pairs(dictionary: Dictionary, candidates: Sequence[Measurement],
                   clique_cells: Callable[[list[tuple[str, ...]]], int]) -> list[tuple[str, str]]:
    """The pairs round 2 of the adaptive strategy measures, from the (pooled) round-1 candidates.

    First the maximum spanning tree of noise-corrected dependence (MST). Then, as AIM does within
    a model-size budget, further pairs whose dependence clears the noise by EXTRA_SIGMAS standard
    deviations and is worth at least EXTRA_MIN_TVD of total variation, strongest first, while
    the model's largest clique (`clique_cells` of the structure) stays within EXTRA_CLIQUE_CELLS
    (a pair that would not fit is skipped and weaker ones are still tried); at most one extra pair
    per two variables.
    """
    pairs = [m for m in candidates if len(m.variables) == 2]
    scores = {tuple(m.variables): dependence(m) for m in pairs}
    chosen = select_tree(dictionary.names, scores)  # type: ignore[arg-type]
    oneway = [(n,) for n in dictionary.names]

    def strong(m: Measurement) -> bool:
        n = float(np.clip(m.values, 0, None).sum())
        return scores[tuple(m.variables)] > max(EXTRA_SIGMAS * dependence_sd(m), 2 * EXTRA_MIN_TVD * n)

    extra = sorted((m for m in pairs if tuple(m.variables) not in chosen and strong(m)),
                   key=lambda m: -scores[tuple(m.variables)])
    added = 0
    for m in extra:
        if added >= len(dictionary.names) // 2:
            break
        trial = chosen + [tuple(m.variables)]
        if clique_cells(oneway + trial) <= EXTRA_CLIQUE_CELLS:
            chosen, added = trial, added + 1
    return chosen  # type: ignore[return-value]


def compress(var: Variable, counts: np.ndarray, threshold: float) -> tuple[int, ...] | None:
    """Group a variable's cells so that each group holds about `threshold` records or more.

    `counts` are noisy 1-way counts (DP outputs; this is post-processing). Numeric bins merge with
    their neighbours, left to right; categories and the declared missing/other/out-of-range cells
    that fall short (and the bins, if all of them together do) are pooled into one group, which
    joins the smallest group if it still falls short. A variable keeps at least two groups (a
    joint table over one group says nothing): if everything would merge, the largest cell
    (numeric: the bins up to the median) stands apart.
    Returns cell -> group (groups numbered by first cell), or None if every cell stays.
    """
    counts = np.clip(np.asarray(counts, dtype=float), 0, None)
    ordered = var.n_bins if var.type == "numeric" else 0
    group = np.full(var.size, -1)
    runs: list[list[int]] = []
    acc = 0.0
    for c in range(ordered):
        if not runs or acc >= threshold:
            runs.append([])
            acc = 0.0
        runs[-1].append(c)
        acc += counts[c]
    if len(runs) > 1 and acc < threshold:
        last = runs.pop()
        runs[-1].extend(last)
    rare = runs.pop() if len(runs) == 1 and counts[runs[0]].sum() < threshold else []  # all bins together fall short
    rare += [c for c in range(ordered, var.size) if counts[c] < threshold]
    runs += [[c] for c in range(ordered, var.size) if counts[c] >= threshold]
    if rare:
        if runs and counts[rare].sum() < threshold:
            min(runs, key=lambda r: counts[r].sum()).extend(rare)
        else:
            runs.append(rare)
    if len(runs) == 1 and var.size > 1:
        if ordered > 1:
            cut = int(np.searchsorted(np.cumsum(counts[:ordered]), counts[:ordered].sum() / 2)) + 1
            runs = [list(range(min(cut, ordered - 1))), [c for c in range(var.size) if c >= min(cut, ordered - 1)]]
        else:
            top = int(np.argmax(counts))
            runs = [[top], [c for c in range(var.size) if c != top]]
    for j, r in enumerate(sorted(runs, key=min)):
        group[r] = j
    if len(runs) == var.size:
        return None
    return tuple(int(g) for g in group)


COMPRESS_NOISE = 1.0  # k: a compressed table's typical cell should hold about k times its noise sigma


def compressed_plan(dictionary: Dictionary, sets: Sequence[tuple[str, ...]], oneway: Sequence[Measurement],
                    rho: float, sites: float) -> list[PlannedMarginal]:
    """Marginals over `sets` with domains compressed by the noisy 1-way counts of an earlier round.

    Each joint table's variables are grouped so that a typical cell of the summed table holds
    about COMPRESS_NOISE times its expected noise: with N records, the noise sigma of the summed
    table (`sites` sites each adding their own; with secure aggregation, parties / (parties -
    colluding) sites' worth) and w variables, every group keeps a share of at
    least (k sigma / N)^(1/w) (unless `compress` must fall back to two groups). (A rule that let a skewed variable keep rare categories next to a
    coarse partner did worse on the demo benchmark: 0.159 against 0.153 mean 2-way TVD at
    epsilon 1.) 1-way sets are measured as they are. Allocation and grouping are iterated, since
    each shapes the other.
    """
    counts = {m.variables[0]: m.values for m in oneway if len(m.variables) == 1 and not m.coarse}
    total = estimate_total([m for m in oneway if len(m.variables) == 1])

    def grouping(p: PlannedMarginal) -> tuple[tuple[int, ...] | None, ...] | None:
        if len(p.variables) == 1 or not all(v in counts for v in p.variables):
            return None
        sigma = math.sqrt(sites) * accounting.scale_for_rho(p.rho)
        share = min(1.0, (COMPRESS_NOISE * sigma / total) ** (1 / len(p.variables)))
        groups = tuple(compress(dictionary[v], counts[v], share * total) for v in p.variables)
        return groups if any(g is not None for g in groups) else None

    plan = allocate(dictionary, sets, rho)
    for _ in range(3):
        new = allocate(dictionary, [PlannedMarginal(p.variables, 0.0, grouping(p)) for p in plan], rho)
        if [p.groups for p in new] == [p.groups for p in plan]:
            break
        plan = new
    return new


def to_proto(marginals: list[PlannedMarginal], dictionary: Dictionary, coordinator: str, purpose: str,
             lifetime_s: float = 1800.0, plan_id: str | None = None) -> pb.QueryPlan:
    """A plan with a fresh random id (single-use at every guard) that expires after lifetime_s."""
    return pb.QueryPlan(
        plan_id=plan_id or uuid.uuid4().hex, dictionary_hash=dictionary.hash, coordinator=coordinator,
        purpose=purpose, marginals=[pb.MarginalQuery(variables=m.variables, rho=m.rho, groups=[
            pb.CellGroups(cell_group=g or ()) for g in m.groups] if m.groups and any(m.groups) else []) for m in marginals],
        expires_at=int(time.time() + lifetime_s))


def sign_plan(plan: pb.QueryPlan, key: Ed25519PrivateKey) -> pb.SignedPlan:
    data = plan.SerializeToString(deterministic=True)
    return pb.SignedPlan(plan=data, signature=key.sign(data), signer=keys.fingerprint(key.public_key()))
