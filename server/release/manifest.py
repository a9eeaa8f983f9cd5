"""The release manifest's sections, derived from the rounds' signed plans and the sites' signed receipts,
and the DP aggregates and fidelity files that go with them."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ...common import accounting, keys, secagg
from ...common import privacy_unit as units
from ...common.cells import group_labels
from ...common.dictionary import Dictionary
from ...common.errors import ReleaseError
from ..measure.aggregate import SiteResult
from ..measure.rounds import Round
from ...protos import guard_pb2 as pb
from ..model.graphical import SITE
from ..model.synthesize import Synthesis

class Inconsistent(ValueError):
    """Signed receipts and plans that no single privacy statement can be made from (the message says why)."""


# ----------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class PlanFacts:
    """What the privacy section needs from one signed plan (for a secure plan, with its verified roster)."""

    round: int
    plan_id: str
    marginals: int
    secure: bool
    colluding: int = 0
    roster: tuple[str, ...] = ()
    dropouts: int = 0  # secure: the dropouts the plan tolerates (its noise shares are sized for them)
    dropped: tuple[str, ...] = ()  # the sites the coordinator's signed recovery statement lists as dropped
    recovered: bool = False  # the signed reveal receipts suffice to remove the masks (`secagg.recovered`)


@dataclass(frozen=True)
class RecoveryFacts:
    """A verified recovery: the coordinator's signed statement and the survivors' signed reveal receipts."""

    statement: bytes
    signature: bytes
    confirmations: tuple[tuple[str, bytes], ...]  # (site, signature over secagg.confirm_bytes)
    reveals: tuple[tuple[str, bytes, bytes], ...]  # (site, RevealReceipt bytes, signature)

    def readable(self, parties: int, dropouts: int) -> bool:
        st = self.parsed()
        return secagg.recovered(st.survivors, st.dropped, [s for s, _, _ in self.reveals], parties, dropouts,
                                [s for s, _ in self.confirmations])

    def parsed(self) -> pb.RecoveryStatement:
        return pb.RecoveryStatement.FromString(self.statement)


def plan_facts(number: int, plan: pb.QueryPlan, roster: Iterable[str] = (), recovery: RecoveryFacts | None = None
               ) -> PlanFacts:
    secure = plan.HasField("secure")
    roster = tuple(sorted(roster))
    d = plan.secure.dropouts if secure else 0
    dropped, recovered = (), False
    if recovery is not None:
        dropped = tuple(recovery.parsed().dropped)
        recovered = recovery.readable(len(roster), d)
    return PlanFacts(number, plan.plan_id, len(plan.marginals), secure, plan.secure.colluding if secure else 0, roster,
                     d, dropped, recovered)


def round_facts(rnd: Round) -> PlanFacts:
    return plan_facts(rnd.number, rnd.plan, [k.site for k in rnd.signed.roster], round_recovery(rnd))


def round_recovery(rnd: Round) -> RecoveryFacts | None:
    r = rnd.recovery
    return None if r is None else RecoveryFacts(r.statement, r.signature, tuple(r.confirmations), tuple(r.reveals))


def recovery_entry(recovery: RecoveryFacts, parties: int, dropouts: int) -> dict[str, Any]:
    """What the manifest says happened to a secure sum with dropouts, every field from signed bytes."""
    st = recovery.parsed()
    return {"survivors": list(st.survivors), "dropped": list(st.dropped),
            "recovered": recovery.readable(parties, dropouts),
            "confirmed_by": [s for s, _ in recovery.confirmations], "revealed_by": [s for s, _, _ in recovery.reveals],
            "statement": keys.b64(recovery.statement), "signature": keys.b64(recovery.signature),
            "confirmations": [{"site": s, "signature": keys.b64(sig)} for s, sig in recovery.confirmations],
            "reveals": [{"site": s, "receipt": keys.b64(raw), "signature": keys.b64(sig)} for s, raw, sig in recovery.reveals]}


def plan_entry_of(number: int, plan: pb.QueryPlan, plan_bytes: bytes, signature: bytes, roster,
                  recovery: RecoveryFacts | None = None) -> dict[str, Any]:
    """A plan's manifest entry, every field from the signed plan (and its signed roster, and for a plan
    with dropouts the signed recovery statement and reveal receipts)."""
    d = plan.secure.dropouts if plan.HasField("secure") else 0
    tolerance = {"dropouts": d, "threshold": secagg.threshold(len(roster), d)} if d else {}
    recovered = {"recovery": recovery_entry(recovery, len(roster), d)} if d and recovery is not None else {}
    return {"round": number, "plan_id": plan.plan_id, "purpose": plan.purpose,
            "rho_per_site": math.fsum(m.rho for m in plan.marginals),
            "marginals": [{"variables": list(m.variables), "rho": m.rho}
                          | groups_entry([list(g.cell_group) or None for g in m.groups] or None) for m in plan.marginals],
            "signed_plan": keys.b64(plan_bytes), "signature": keys.b64(signature),
            "sha256": hashlib.sha256(plan_bytes).hexdigest()} | addressees_entry(plan) | ({"secure": {
                "colluding": plan.secure.colluding, "min_parties": plan.secure.min_parties,
                "roster": [{"site": k.site, "public_key": keys.b64(k.public_key), "signature": keys.b64(k.signature),
                            "signer": k.signer} for k in roster]} | tolerance | recovered} if plan.HasField("secure") else {})


def addressees_entry(plan: pb.QueryPlan) -> dict[str, Any]:
    """The sites a signed plan is addressed to, (site, key fingerprint) each, as the manifest repeats them
    (nothing for a plan without addressees, as plans were before guards required them)."""
    return {"addressees": [{"site": a.site, "signer": a.signer} for a in plan.addressees]} if plan.addressees else {}


def plan_entry(rnd: Round) -> dict[str, Any]:
    return plan_entry_of(rnd.number, rnd.plan, rnd.signed.plan, rnd.signed.signature, rnd.signed.roster,
                         round_recovery(rnd))


def groups_entry(groups) -> dict[str, Any]:
    """A compressed marginal's groupings for the manifest and aggregates.json (nothing if none)."""
    if groups is None or all(g is None for g in groups):
        return {}
    return {"groups": [None if g is None else [int(x) for x in g] for g in groups]}


def to_json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1).encode() + b"\n"


# ----------------------------------------------------------------------------- receipts -> privacy
def unreadable_plans(by_site: dict[str, list[pb.BudgetReceipt]], plans: list[PlanFacts]) -> set[str]:
    """Secure plans whose masked sum cannot be read: without dropouts, a roster member has no receipt
    for them; with dropouts, the signed reveals do not suffice or the sites without a receipt are not
    exactly those the signed recovery statement lists as dropped. Their receipts were charged for
    nothing, and count like every other."""
    receipted = {(site, rc.plan_id) for site, rcs in by_site.items() for rc in rcs}
    out = set()
    for p in plans:
        missing = {s for s in p.roster if (s, p.plan_id) not in receipted}
        if p.secure and (not (p.recovered and missing == set(p.dropped)) if p.dropouts else missing):
            out.add(p.plan_id)
    return out


def release_delta(by_site: dict[str, list[pb.BudgetReceipt]]) -> float:
    """The one delta every receipt of a release states (a release makes one (epsilon, delta) statement)."""
    deltas = {rc.delta for rcs in by_site.values() for rc in rcs}
    if len(deltas) != 1:
        raise Inconsistent(f"the sites' receipts state different deltas ({sorted(deltas)}); one release states one delta")
    return deltas.pop()


def site_entry(receipts: list[pb.BudgetReceipt], plans: list[PlanFacts], unreadable: set[str]) -> dict[str, Any]:
    """One site's spending in a release, every figure from its signed receipts."""
    last = max(receipts, key=lambda rc: rc.ledger_seq)
    rho = math.fsum(rc.rho_debited for rc in receipts)
    marginals = {p.plan_id: p.marginals for p in plans}
    unit, k = site_unit(receipts)
    return {"status": "answered", "plans": len(receipts), "rho": rho, "epsilon": accounting.epsilon(rho, last.delta),
            "unit": unit, "rows_per_patient": k,
            "rho_if_others_collude": math.fsum(rc.rho_alone if rc.parties else rc.rho_debited for rc in receipts),
            "rho_charged_for_nothing": math.fsum(rc.rho_debited for rc in receipts if rc.plan_id in unreadable),
            "delta": last.delta, "rho_total": last.rho_spent_total,
            "epsilon_total": accounting.epsilon(last.rho_spent_total, last.delta),
            "rho_limit": last.rho_limit, "marginals": sum(marginals[rc.plan_id] for rc in receipts)}


def site_unit(receipts: list[pb.BudgetReceipt]) -> tuple[str, int]:
    """The privacy unit a site's signed receipts in this release support together (common/privacy_unit.py)."""
    return units.weakest([(rc.unit, rc.rows_per_patient or 1) for rc in receipts])


def release_unit(by_site: dict[str, list[pb.BudgetReceipt]]) -> str:
    """The privacy unit the statement names: the one place it is decided, from the receipts' units."""
    return units.statement({site: site_unit(rcs) for site, rcs in by_site.items()})


def privacy_figures(by_site: dict[str, list[pb.BudgetReceipt]], plans: list[PlanFacts]) -> dict[str, Any]:
    """Every figure the privacy section and its statement state, from signed receipts and plans."""
    if not by_site or not all(by_site.values()):
        raise Inconsistent("no site's receipt: a privacy statement needs at least one")
    delta = release_delta(by_site)
    unreadable = unreadable_plans(by_site, plans)
    sites = {s: site_entry(rcs, plans, unreadable) for s, rcs in sorted(by_site.items())}
    answered = {rc.plan_id for rcs in by_site.values() for rc in rcs}
    secure = [p for p in plans if p.secure and p.plan_id in answered]
    unread = unreadable_plans(by_site, plans)
    tolerant = [{"round": p.round, "dropouts": p.dropouts, "threshold": secagg.threshold(len(p.roster), p.dropouts),
                 "parties": len(p.roster), "dropped": list(p.dropped), "recovered": p.plan_id not in unread}
                for p in secure if p.dropouts]
    rho = max(e["rho"] for e in sites.values())
    alone = max(e["rho_if_others_collude"] for e in sites.values())
    return {"unit": release_unit(by_site), "delta": delta, "rho": rho, "epsilon": accounting.epsilon(rho, delta),
            "receipts": sum(len(rcs) for rcs in by_site.values()), "plans": len(answered),
            "rho_charged_for_nothing": max(e["rho_charged_for_nothing"] for e in sites.values()),
            "secure_rounds": sorted(p.round for p in secure),
            "colluding": max((p.colluding for p in secure), default=0),
            "rho_if_others_collude": alone, "epsilon_if_others_collude": accounting.epsilon(alone, delta),
            "dropouts": tolerant, "sites": sites}


def privacy_statement(f: dict[str, Any]) -> str:
    """The privacy statement, word for word, from verified figures (`privacy_figures`); verify regenerates it."""
    text = [f"Privacy unit: {f['unit']}. Each patient is protected by the budget of the site that holds them.",
            f"In this release no site spent more than rho = {f['rho']:.4g} (zCDP), i.e. ({f['epsilon']:.3g}, "
            f"{f['delta']:g})-DP, as {f['receipts']} signed site receipt(s) for {f['plans']} signed plan(s) state."]
    if f["rho_charged_for_nothing"] > 0:
        text.append(f"That counts up to rho = {f['rho_charged_for_nothing']:.4g} a site was charged for secure sums "
                    "that could not be read.")
    if f["secure_rounds"]:
        text.append(f"Round(s) {', '.join(map(str, f['secure_rounds']))} were secure sums: their rho counts on at most "
                    f"{f['colluding']} enrolled site(s) colluding with the coordinator; if all the other sites colluded, "
                    f"no site's loss would exceed rho = {f['rho_if_others_collude']:.4g}, i.e. "
                    f"({f['epsilon_if_others_collude']:.3g}, {f['delta']:g})-DP.")
    for t in f["dropouts"]:
        happened = ((f"{', '.join(t['dropped'])} enrolled but did not answer, and " if t["dropped"] else
                     "every enrolled site answered, and ")
                    + ("its sum was read" + (f" over the other {t['parties'] - len(t['dropped'])} sites" if t["dropped"]
                                             else "") if t["recovered"] else "its sum could not be read"))
        text.append(f"Round {t['round']} tolerated {t['dropouts']} of its {t['parties']} enrolled sites dropping out "
                    f"(each site's noise share sized so that any {t['threshold']} shares carry the planned noise; masks "
                    f"removable with the reveals of {t['threshold']} sites, or of every site that answered if some did "
                    f"not): {happened}.")
    text.append("If a patient appears at k sites, their loss is at most the sum over those sites. Epsilon is OpenDP's "
                "zCDP-to-approximate-DP privacy profile; each site's rho is the sum of its signed receipts.")
    return " ".join(text)


def privacy_section(f: dict[str, Any]) -> dict[str, Any]:
    """The manifest's privacy section from verified figures (`privacy_figures`)."""
    trust = {"secure_aggregation": (
        f"Round(s) {', '.join(map(str, f['secure_rounds']))} were secure sums: each site masked its tables and added a "
        "share of the noise, and only the sum over every enrolled site could be read. Each table is charged the smaller "
        f"of two valid bounds: Kairouz, Liu & Steinke's distributed discrete Gaussian bound, which counts on at most "
        f"{f['colluding']} enrolled site(s) colluding with the coordinator, and OpenDP's map of the site's own noise "
        "share (receipts name the bound). Each site's rho_if_others_collude is its loss if all the other sites "
        "colluded.")} if f["secure_rounds"] else {}
    tolerance = {"secure_dropouts": f["dropouts"]} if f["dropouts"] else {}
    return trust | tolerance | {
        "unit": f["unit"],
        "site_units": {s: {"unit": e["unit"], "rows_per_patient": e["rows_per_patient"],
                           "description": units.describe(e["unit"], e["rows_per_patient"])}
                       for s, e in f["sites"].items()},
        "model": "zero-concentrated DP per site; rho composes additively across plans and releases",
        "delta": f["delta"],
        "release_rho_max": f["rho"],
        "release_epsilon_max": f["epsilon"],
        "rho_charged_for_nothing_max": f["rho_charged_for_nothing"],
        "receipts": f["receipts"],
        "statement": privacy_statement(f),
    }


def release_sections(by_site: dict[str, list[pb.BudgetReceipt]], plans: list[PlanFacts]) -> tuple[dict, dict]:
    """The manifest's `privacy` and `sites` sections: what the builder writes and `verify` recomputes."""
    f = privacy_figures(by_site, plans)
    return privacy_section(f), f["sites"]


def receipt_entry_of(site: str, signer: str, raw: bytes, signature: bytes, rc: pb.BudgetReceipt,
                     used: bool) -> dict[str, Any]:
    """A receipt's manifest entry: the signed bytes, and its fields repeated for readers (verify compares them)."""
    return {"site": site, "signer": signer, "receipt": keys.b64(raw), "signature": keys.b64(signature),
            "plan_id": rc.plan_id, "plan_sha256": rc.plan_sha256.hex(), "rho_debited": rc.rho_debited,
            "rho_spent_total": rc.rho_spent_total, "rho_limit": rc.rho_limit, "delta": rc.delta,
            "debited_at": rc.debited_at, "ledger_seq": rc.ledger_seq, "used": used,
            "unit": rc.unit, "rows_per_patient": rc.rows_per_patient} | (
                {"parties": rc.parties, "colluding": rc.colluding, "rho_alone": rc.rho_alone, "bound": rc.bound}
                | ({"dropouts": rc.dropouts} if rc.dropouts else {}) if rc.parties else {})


def receipt_entry(r: SiteResult, used: bool = True) -> dict[str, Any]:
    return receipt_entry_of(r.site, r.signer, r.summary.receipt, r.summary.receipt_signature, r.receipt, used)


# ----------------------------------------------------------------------------- sites not included
NO_RECEIPT_UNKNOWN = ("TIMEOUT", "GUARD_TIMEOUT", "GUARD_UNAVAILABLE", "REJECTED", "NO_REPLY", "BAD_REPLY", "GUARD_BUSY",
                      "RELAY_ERROR", "RELAY_MISCONFIGURED", "PLAN_TOO_LARGE", "INTERNAL")


def charged_text(code: str, receipted: bool) -> str:
    """What an entry of sites_not_included says about the site's charge: from its code and whether the
    release holds a receipt of the site for that plan (then it is counted in the site's rho)."""
    if receipted:
        return "yes, for nothing (the masked sum could not be read); its receipt is in this release and counted"
    if code in ("NOT_SENT", "NOT_IN_ROSTER", "NOT_VERIFIED"):
        return "no (the plan was not sent to it to be answered)"
    if code in NO_RECEIPT_UNKNOWN or code.startswith("FLOWER_"):
        return "unknown: no receipt in this release; check the site's ledger"
    return "no (the guard refused the plan)"


def sum_incomplete_message(rho: float, missing: Iterable[str], dropouts: int = 0) -> str:
    missing = sorted(missing)
    if not dropouts:
        return (f"answered and was charged rho {rho:.4g} for nothing: the masked sum needs every enrolled site, and "
                f"{', '.join(missing)} did not answer")
    if len(missing) > dropouts:
        return (f"answered and was charged rho {rho:.4g} for nothing: {', '.join(missing)} did not answer, more than "
                f"the {dropouts} dropout(s) the plan tolerates")
    return (f"answered and was charged rho {rho:.4g} for nothing: the masks could not be removed (too few signed "
            "reveals)" + (f"; {', '.join(missing)} did not answer" if missing else ""))


def exclusion_entries(rounds: list[Round], known: set[str]) -> list[dict[str, Any]]:
    """sites_not_included: one entry per site and round without a usable answer. A failure is tied to a
    site when the transport's name for the sender is a site the coordinator knows or sent a verified
    reply under that name in some round; otherwise it is listed by that name as a `node` (and excuses
    nobody). A site charged for an unreadable secure sum is listed with its receipt's figures."""
    where: dict[str, str] = {}
    for rnd in rounds:
        for name, site in rnd.where.items():
            where.setdefault(name, site)
    out: list[dict[str, Any]] = []
    for rnd in rounds:
        used = {r.site for r in rnd.results}
        wasted = {r.site: r.receipt for r in rnd.wasted}
        missing = {k.site for k in rnd.signed.roster} - set(wasted)  # roster members that did not answer
        listed: set[str] = set()
        for f in rnd.failures:
            site = where.get(f.site) or (f.site if f.site in known else None)
            head = {"round": rnd.number, "plan_id": rnd.plan.plan_id}
            if site is None or site in used or site in listed or (site in wasted) != (f.code == "SUM_INCOMPLETE"):
                out.append({"node": f.site} | head | {"code": f.code, "message": f.message,
                                                      "charged": charged_text(f.code, False)})
                continue
            listed.add(site)
            message = (sum_incomplete_message(wasted[site].rho_debited, missing, rnd.plan.secure.dropouts)
                       if site in wasted else f.message)
            out.append({"site": site} | head | {"code": f.code, "message": message,
                                                "charged": charged_text(f.code, site in wasted)})
    return out


def aggregates_json(dictionary: Dictionary, syn: Synthesis) -> dict[str, Any]:
    def cells(v: str, g) -> list[str]:
        return group_labels(syn.groups, g) if v == SITE else group_labels(dictionary[v].cells, g)

    return {"note": "the sites' noisy marginals (DP outputs), summed per site group when `site` is a variable; "
                    "variance is the noise variance of each cell (null: not observed); `groups` (compressed "
                    "tables): per variable, the group of each dictionary cell",
            "marginals": [{"variables": list(m.variables), "cells": [cells(v, g) for v, g in zip(m.variables, m.maps())],
                           **groups_entry(m.groups),
                           "counts": m.values.ravel().tolist(),
                           "variance": [None if not math.isfinite(x) else x
                                        for x in np.broadcast_to(m.variance, m.values.shape).ravel().tolist()]}
                          for m in syn.measurements]}


def fidelity_to_aggregates(dictionary: Dictionary, measurements, samples: np.ndarray) -> dict[str, Any]:
    """Total variation distance between the records and each DP aggregate (clipped, normalised)."""
    index = {n: j for j, n in enumerate(dictionary.names)}
    rows = []
    for m in measurements:
        flat = m.index([samples[:, index[v]] for v in m.variables])
        synth = np.bincount(flat, minlength=m.values.size) / max(len(samples), 1)
        target = np.clip(m.values.ravel(), 0, None)
        target = target / target.sum() if target.sum() > 0 else np.full_like(target, 1 / target.size)
        rows.append({"variables": list(m.variables), "tvd": float(0.5 * np.abs(synth - target).sum())}
                    | ({"grouped": True} if m.coarse else {}))  # over the table's groups of cells, not every cell
    by_width: dict[int, list[float]] = {}
    for r in rows:
        by_width.setdefault(len(r["variables"]), []).append(r["tvd"])
    return {"note": "TVD between the synthetic records and the noisy DP aggregates they were fitted to (no raw data used)",
            "mean_tvd_by_width": {str(k): float(np.mean(v)) for k, v in sorted(by_width.items())}, "marginals": rows}


# ----------------------------------------------------------------------------- checking derived fields
def _raise(mpath: Path, message: str) -> None:
    raise ReleaseError(f"{mpath}: {message}")


def compare_derived(mpath: Path, where: str, stated: Any, expected: dict[str, Any],
             messages: dict[str, Callable[[Any], str]] | None = None) -> None:
    """Every field of `stated` must be exactly what the signed receipts and plans give (`expected`)."""
    if not isinstance(stated, dict):
        _raise(mpath, f"{where}: missing or not an object")
    for key in list(expected) + [k for k in stated if k not in expected]:
        if key not in expected:
            _raise(mpath, f"{where}: field {key!r} is not derived from any signed receipt or plan")
        if key not in stated:
            _raise(mpath, f"{where}: field {key!r} is missing")
        if stated[key] != expected[key] or type(stated[key]) is not type(expected[key]):
            if messages and key in messages:
                _raise(mpath, messages[key](stated[key]))
            _raise(mpath, f"{where}: {key} {stated[key]!r} does not follow from the signed receipts and plans "
                         f"(they give {expected[key]!r})")
