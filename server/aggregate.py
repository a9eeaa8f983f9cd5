"""Verify the sites' signed summaries against the plan and sum them into measurements.

A summary counts only if it is signed by a site key the coordinator trusts (the key, not the
summary's own claim, decides which site it is), its receipt is signed by the same key and
names this plan (by the hash of the exact signed plan bytes), and every table has the
planned variables, the dictionary's shape and no more rho than planned. Summed cells carry
the sum of the sites' noise variances, so sites are weighted by their noise, never by an
assumed size.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..common import keys
from ..common.dictionary import Dictionary
from ..protos import guard_pb2 as pb
from .model import Measurement


class SummaryRejected(Exception):
    pass


@dataclass(frozen=True)
class SiteResult:
    site: str
    summary: pb.Summary
    receipt: pb.BudgetReceipt
    signer: str


def verify_summary(signed: pb.SignedSummary, signed_plan: pb.SignedPlan, dictionary: Dictionary,
                   site_keys: dict[str, Ed25519PublicKey]) -> SiteResult:
    """Check signatures, receipt and shapes; raise SummaryRejected with the reason."""
    by_fp = {keys.fingerprint(k): (site, k) for site, k in site_keys.items()}
    if signed.signer not in by_fp:
        raise SummaryRejected(f"signed by an unknown key {signed.signer[:80]!r}")
    site, key = by_fp[signed.signer]
    if not keys.verify(key, signed.signature, signed.summary):
        raise SummaryRejected("its signature does not verify (altered or forged)")
    summary = pb.Summary.FromString(signed.summary)
    if summary.site != site:
        raise SummaryRejected(f"claims site {summary.site!r} but is signed with {site!r}'s key")
    if not keys.verify(key, summary.receipt_signature, summary.receipt):
        raise SummaryRejected("its budget receipt's signature does not verify")
    receipt = pb.BudgetReceipt.FromString(summary.receipt)
    plan = pb.QueryPlan.FromString(signed_plan.plan)
    if summary.plan_id != plan.plan_id or receipt.plan_id != plan.plan_id:
        raise SummaryRejected(f"answers plan {summary.plan_id!r}, not {plan.plan_id!r}")
    if receipt.plan_sha256 != hashlib.sha256(signed_plan.plan).digest() or receipt.site != site:
        raise SummaryRejected("its receipt is for other plan bytes or another site")
    if summary.dictionary_hash != dictionary.hash or receipt.dictionary_hash != dictionary.hash:
        raise SummaryRejected(f"uses dictionary {summary.dictionary_hash!r}, not {dictionary.hash!r}")
    if len(summary.marginals) != len(plan.marginals):
        raise SummaryRejected(f"has {len(summary.marginals)} tables for {len(plan.marginals)} planned marginals")
    total = 0.0
    for i, (got, want) in enumerate(zip(summary.marginals, plan.marginals)):
        shape = tuple(dictionary[v].size for v in want.variables)
        if tuple(got.variables) != tuple(want.variables) or tuple(got.shape) != shape:
            raise SummaryRejected(f"table {i} is over {list(got.variables)} {list(got.shape)}, planned {list(want.variables)} {list(shape)}")
        if len(got.counts) != math.prod(shape):
            raise SummaryRejected(f"table {i} has {len(got.counts)} cells, expected {math.prod(shape)}")
        if not (0 < got.rho <= want.rho * (1 + 1e-9)) or not (got.noise_scale > 0 and math.isfinite(got.noise_scale)):
            raise SummaryRejected(f"table {i} reports rho {got.rho!r} / scale {got.noise_scale!r} for a planned rho of {want.rho!r}")
        total += got.rho
    if not math.isclose(receipt.rho_debited, total, rel_tol=1e-9):
        raise SummaryRejected(f"its receipt debits rho {receipt.rho_debited!r} but its tables cost {total!r}")
    return SiteResult(site, summary, receipt, signed.signer)


def aggregate(plan: pb.QueryPlan, results: list[SiteResult]) -> list[Measurement]:
    """Sum the sites' noisy tables per planned marginal; variance adds up across sites."""
    if not results:
        raise ValueError("no site answered: nothing to aggregate")
    out = []
    for i, m in enumerate(plan.marginals):
        tables = [r.summary.marginals[i] for r in results]
        shape = tuple(tables[0].shape)
        values = np.sum([np.asarray(t.counts, dtype=np.float64) for t in tables], axis=0).reshape(shape)
        variance = float(sum(t.noise_scale ** 2 for t in tables))
        out.append(Measurement(tuple(m.variables), values, variance))
    return out
