"""Query plans: which marginals every site measures, and with how much of the release's rho.

One-round plan: all 1-way marginals plus the 2-/3-way marginals of a structure known before
any data is seen (the dictionary's declared dependencies, or a chain over all variables if
none are declared), each with an equal share of the per-site rho. Spending nothing on
structure selection keeps a release to a single Flower round.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..common import keys
from ..common.dictionary import Dictionary
from ..protos import guard_pb2 as pb


@dataclass(frozen=True)
class PlannedMarginal:
    variables: tuple[str, ...]
    rho: float


def structure(dictionary: Dictionary) -> list[tuple[str, ...]]:
    """The model's cliques beyond 1-way: declared dependencies, else a chain in dictionary order."""
    if dictionary.dependencies:
        return [tuple(d) for d in dictionary.dependencies]
    names = dictionary.names
    return [(a, b) for a, b in zip(names, names[1:])]


def one_round_plan(dictionary: Dictionary, rho: float) -> list[PlannedMarginal]:
    """All 1-way marginals plus the structure's marginals, splitting rho equally."""
    if not rho > 0:
        raise ValueError(f"rho per site must be positive, got {rho!r}")
    sets = [(n,) for n in dictionary.names] + structure(dictionary)
    return [PlannedMarginal(v, rho / len(sets)) for v in sets]


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
