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

from ...common import cells, keys, secagg
from ...common.dictionary import Dictionary
from ...protos import guard_pb2 as pb
from ..model.graphical import SITE, Measurement


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
    secure = plan.HasField("secure")
    if secure:
        try:
            roster = secagg.check_roster(signed_plan.roster, receipt.plan_sha256, site_keys)
        except secagg.RosterError as e:
            raise SummaryRejected(f"the plan's roster does not verify: {e}") from None
        if (site not in roster or receipt.roster_sha256 != secagg.roster_sha256(roster) or receipt.parties != len(roster)
                or receipt.colluding != plan.secure.colluding or receipt.dropouts != plan.secure.dropouts):
            raise SummaryRejected("its receipt is for another roster or another trust assumption")
        recipients = [sh.recipient for sh in summary.shares]
        if recipients != (sorted(set(roster) - {site}) if plan.secure.dropouts else []):
            raise SummaryRejected("its sealed shares are not one for each other roster member"
                                  if plan.secure.dropouts else "it carries sealed shares for a plan without dropouts")
    elif receipt.parties or receipt.roster_sha256 or receipt.dropouts or len(summary.shares):
        raise SummaryRejected("its receipt claims a secure sum for a plan without secure aggregation")
    if len(summary.marginals) != len(plan.marginals):
        raise SummaryRejected(f"has {len(summary.marginals)} tables for {len(plan.marginals)} planned marginals")
    total = 0.0
    for i, (got, want) in enumerate(zip(summary.marginals, plan.marginals)):
        shape = planned_shape(want, dictionary)[1]
        if tuple(got.variables) != tuple(want.variables) or tuple(got.shape) != shape:
            raise SummaryRejected(f"table {i} is over {list(got.variables)} {list(got.shape)}, planned {list(want.variables)} {list(shape)}")
        values, other = (got.masked, got.counts) if secure else (got.counts, got.masked)
        if len(values) != math.prod(shape) or len(other):
            raise SummaryRejected(f"table {i} has {len(values)} {'masked ' if secure else ''}cells, expected {math.prod(shape)}"
                                  + (" (and no others)" if len(other) else ""))
        if not (0 < got.rho <= want.rho * (1 + 1e-9)) or not (got.noise_scale > 0 and math.isfinite(got.noise_scale)):
            raise SummaryRejected(f"table {i} reports rho {got.rho!r} / scale {got.noise_scale!r} for a planned rho of {want.rho!r}")
        total += got.rho
    if not math.isclose(receipt.rho_debited, total, rel_tol=1e-9):
        raise SummaryRejected(f"its receipt debits rho {receipt.rho_debited!r} but its tables cost {total!r}")
    return SiteResult(site, summary, receipt, signed.signer)


def verify_reveal(signed: pb.SignedReveal, site_keys: dict[str, Ed25519PublicKey], plan_sha256: bytes, statement: bytes,
                  survivors: list[str], dropped: list[str]) -> tuple[str, pb.Reveal]:
    """Check a survivor's signed reveal (signature, receipt, and that it reveals exactly what the
    statement asks: self-mask shares of every survivor, pair seeds with every dropped site)."""
    by_fp = {keys.fingerprint(k): (site, k) for site, k in site_keys.items()}
    if signed.signer not in by_fp:
        raise secagg.RosterError(f"a reveal signed by an unknown key {signed.signer[:80]!r}")
    site, key = by_fp[signed.signer]
    if not keys.verify(key, signed.signature, signed.reveal):
        raise secagg.RosterError(f"the reveal of {site!r}: its signature does not verify")
    reveal = pb.Reveal.FromString(signed.reveal)
    if reveal.site != site or reveal.plan_sha256 != plan_sha256:
        raise secagg.RosterError(f"the reveal of {site!r} is for another site or plan")
    secagg.check_reveal_receipt(reveal.receipt, reveal.receipt_signature, key, site, plan_sha256, statement,
                                survivors, dropped)
    if [s.owner for s in reveal.shares] != sorted(survivors) or [s.peer for s in reveal.seeds] != sorted(dropped) \
            or any(len(s.share) != 16 for s in reveal.shares) or any(len(s.seed) != 32 for s in reveal.seeds):
        raise secagg.RosterError(f"the reveal of {site!r} does not reveal what its receipt says")
    return site, reveal


def planned_shape(query: pb.MarginalQuery, dictionary: Dictionary) -> tuple[tuple[np.ndarray | None, ...], tuple[int, ...]]:
    """The groupings (None per variable measured cell by cell) and table shape of a planned marginal."""
    return cells.check_groups([dictionary[v].size for v in query.variables], [list(g.cell_group) for g in query.groups])


def aggregate(plan: pb.QueryPlan, results: list[SiteResult], dictionary: Dictionary,
              groups: dict[str, str] | None = None, correction: np.ndarray | None = None) -> list[Measurement]:
    """One measurement per planned marginal from the sites' noisy tables; variances add up across sites.

    Without `groups` the tables are summed (pooled). With `groups` (every participating site ->
    its group label) each measurement gains a leading `site` axis over the sorted group labels:
    a group's slice is the sum of its sites' tables, unobserved (infinite variance) unless every
    site of the group answered this plan. A secure plan's masked tables can only be summed, and
    only over its whole roster (the caller passes every enrolled site's result, and no groups), or,
    for a plan with dropouts, over the sites that answered, after subtracting the `correction` their
    reveals gave (rounds._recover).
    """
    if plan.HasField("secure") and plan.secure.dropouts and correction is None:
        raise ValueError("a secure sum with dropouts cannot be read before its masks are removed (no correction)")
    if not results:
        raise ValueError("no site answered: nothing to aggregate")
    if groups and plan.HasField("secure"):
        raise ValueError("a secure plan's tables can only be pooled")
    labels = sorted(set(groups.values())) if groups else []
    by_site = {r.site: r for r in results}
    out = []
    offset = 0
    for i, m in enumerate(plan.marginals):
        maps, shape = planned_shape(m, dictionary)
        coarse = maps if any(g is not None for g in maps) else None
        cells_i = math.prod(shape)
        part = None if correction is None else correction[offset:offset + cells_i]
        offset += cells_i

        def summed(sites: list[str]) -> tuple[np.ndarray, float]:
            tables = [by_site[s].summary.marginals[i] for s in sites]
            if plan.HasField("secure"):
                values = secagg.unmasked_sum([t.masked for t in tables], part).astype(np.float64).reshape(shape)
            else:
                values = np.sum([np.asarray(t.counts, dtype=np.float64) for t in tables], axis=0).reshape(shape)
            return values, float(sum(t.noise_scale ** 2 for t in tables))

        if not groups:
            values, variance = summed(sorted(by_site))
            out.append(Measurement(tuple(m.variables), values, variance, coarse))
            continue
        values = np.zeros((len(labels),) + shape)
        variance = np.full((len(labels),) + (1,) * len(shape), np.inf)
        for g, label in enumerate(labels):
            members = [s for s, lab in groups.items() if lab == label]
            if all(s in by_site for s in members):
                values[g], variance[g] = summed(members)
        out.append(Measurement((SITE,) + tuple(m.variables), values, variance, coarse and (None,) + coarse))
    return out
