"""Query plans: which marginals every site measures, and with how much of the release's rho.

Two strategies, both spending exactly the per-site rho of the release:

- ``dictionary`` (one round): all 1-way marginals plus the 2-/3-way marginals of a structure
  known before any data is seen (the dictionary's declared dependencies, the LLM's clinical
  prior, or a chain if nothing is declared). No budget goes to structure selection and the
  release takes a single Flower round.
- ``adaptive`` (two rounds, in the spirit of MST): round 1 spends a fraction of rho on all
  1-way and all 2-way marginals as cheap candidates; the coordinator sums them and picks a
  maximum spanning tree of noise-corrected pairwise dependence; round 2 spends the rest on the
  chosen pairs. Every measurement of both rounds feeds the estimator, so nothing is wasted.

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
from typing import Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..common import keys
from ..common.dictionary import Dictionary
from ..protos import guard_pb2 as pb
from .model import Measurement, max_spanning_tree

STRATEGIES = ("dictionary", "adaptive")
ONE_WAY_WEIGHT = 3.0


@dataclass(frozen=True)
class PlannedMarginal:
    variables: tuple[str, ...]
    rho: float


def structure(dictionary: Dictionary, extra: Sequence[Sequence[str]] = ()) -> list[tuple[str, ...]]:
    """Cliques beyond 1-way known without data: declared dependencies (+ extra), else a chain."""
    sets = [tuple(d) for d in dictionary.dependencies] + [tuple(e) for e in extra]
    if not sets:
        names = dictionary.names
        sets = [(a, b) for a, b in zip(names, names[1:])]
    return list(dict.fromkeys(sets))


def allocate(dictionary: Dictionary, sets: Sequence[tuple[str, ...]], rho: float) -> list[PlannedMarginal]:
    """Split rho over `sets` in proportion to cells^(2/3) (1-way tables: ONE_WAY_WEIGHT times that)."""
    if not (rho > 0 and math.isfinite(rho)):
        raise ValueError(f"rho per site must be a positive finite number, got {rho!r}")
    weights = [(ONE_WAY_WEIGHT if len(s) == 1 else 1.0) * math.prod(dictionary[v].size for v in s) ** (2 / 3)
               for s in sets]
    total = sum(weights)
    return [PlannedMarginal(tuple(s), rho * w / total) for s, w in zip(sets, weights)]


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


def select_tree(names: Sequence[str], pairs: dict[tuple[str, str], float]) -> list[tuple[str, str]]:
    """Maximum spanning tree over `names` by pair score."""
    return max_spanning_tree(names, pairs)


def second_round_plan(dictionary: Dictionary, candidates: Sequence[Measurement], rho: float) -> list[PlannedMarginal]:
    """Round 2 of the adaptive strategy: the spanning tree the candidates point to (pooled tables)."""
    scores = {tuple(m.variables): dependence(m) for m in candidates if len(m.variables) == 2}
    tree = select_tree(dictionary.names, scores)  # type: ignore[arg-type]
    return allocate(dictionary, tree, rho)


def to_proto(marginals: list[PlannedMarginal], dictionary: Dictionary, coordinator: str, purpose: str,
             lifetime_s: float = 1800.0, plan_id: str | None = None) -> pb.QueryPlan:
    """A plan with a fresh random id (single-use at every guard) that expires after lifetime_s."""
    return pb.QueryPlan(
        plan_id=plan_id or uuid.uuid4().hex, dictionary_hash=dictionary.hash, coordinator=coordinator,
        purpose=purpose, marginals=[pb.MarginalQuery(variables=m.variables, rho=m.rho) for m in marginals],
        expires_at=int(time.time() + lifetime_s))


def sign_plan(plan: pb.QueryPlan, key: Ed25519PrivateKey) -> pb.SignedPlan:
    data = plan.SerializeToString(deterministic=True)
    return pb.SignedPlan(plan=data, signature=key.sign(data), signer=keys.fingerprint(key.public_key()))
