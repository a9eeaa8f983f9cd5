"""The release manifest's sections, derived from the rounds' signed plans and the sites' signed receipts,
and the DP aggregates and fidelity files that go with them."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

from ...common import accounting, keys, privacy_unit
from ...common.cells import group_labels
from ...common.dictionary import Dictionary
from ..measure.aggregate import SiteResult
from ..measure.rounds import Round
from ..measure.transport import SiteFailure
from ..model.graphical import SITE
from ..model.synthesize import Synthesis

def site_unit(rs: list[SiteResult]) -> tuple[str, int]:
    """The (unit, rows_per_patient) a site's signed receipts in this release support (common/privacy_unit.py)."""
    return privacy_unit.weakest([(r.receipt.unit, r.receipt.rows_per_patient or 1) for r in rs])


def plan_entry(rnd: Round) -> dict[str, Any]:
    return {"round": rnd.number, "plan_id": rnd.plan.plan_id, "purpose": rnd.plan.purpose,
            "rho_per_site": sum(m.rho for m in rnd.marginals),
            "marginals": [{"variables": list(m.variables), "rho": m.rho} | groups_entry(m.groups) for m in rnd.marginals],
            "signed_plan": keys.b64(rnd.signed.plan), "signature": keys.b64(rnd.signed.signature),
            "sha256": hashlib.sha256(rnd.signed.plan).hexdigest()} | ({"secure": {
                "colluding": rnd.plan.secure.colluding, "min_parties": rnd.plan.secure.min_parties,
                "roster": [{"site": k.site, "public_key": keys.b64(k.public_key), "signature": keys.b64(k.signature),
                            "signer": k.signer} for k in rnd.signed.roster]}} if rnd.secure else {})


def groups_entry(groups) -> dict[str, Any]:
    """A compressed marginal's groupings for the manifest and aggregates.json (nothing if none)."""
    if groups is None or all(g is None for g in groups):
        return {}
    return {"groups": [None if g is None else [int(x) for x in g] for g in groups]}


def to_json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1).encode() + b"\n"


def privacy_section(delta: float, colluding: int, answered: dict[str, list[SiteResult]],
                    rounds: list[Round]) -> dict[str, Any]:
    rho = max(sum(r.receipt.rho_debited for r in rs) for rs in answered.values())
    eps = accounting.epsilon(rho, delta)
    secure = [rnd for rnd in rounds if rnd.secure]
    trust = {"secure_aggregation": (
        f"Round(s) {', '.join(str(rnd.number) for rnd in secure)} were secure sums: each site masked its tables and "
        "added a share of the noise, and only the sum over every enrolled site could be read. Their rho counts on "
        f"at most {colluding} enrolled site(s) colluding with the coordinator (Kairouz, Liu & Steinke's distributed "
        "discrete Gaussian bound); each site's rho_if_others_collude is its loss if all the other sites did.")} if secure else {}
    units = {site: site_unit(rs) for site, rs in answered.items()}
    return trust | {
        "unit": privacy_unit.statement(units),
        "site_units": {site: {"unit": u, "rows_per_patient": k, "description": privacy_unit.describe(u, k)}
                       for site, (u, k) in sorted(units.items())},
        "model": "zero-concentrated DP per site; rho composes additively across plans and releases",
        "delta": delta,
        "release_rho_max": rho,
        "release_epsilon_max": eps,
        "statement": (f"Each patient is protected by the budget of the site that holds them. In this release no "
                      f"site spent more than rho = {rho:.4g}, i.e. ({eps:.3g}, {delta:g})-DP. "
                      "If a patient appears at k sites, their loss is at most the sum over those sites. "
                      "Epsilon is OpenDP's zCDP-to-approximate-DP privacy profile; each site's rho is in its signed receipts."),
    }


def site_entry(rs: list[SiteResult]) -> dict[str, Any]:
    last = max((r.receipt for r in rs), key=lambda rc: rc.ledger_seq)
    rho = sum(r.receipt.rho_debited for r in rs)
    alone = math.fsum(r.receipt.rho_alone if r.receipt.parties else r.receipt.rho_debited for r in rs)
    unit, k = site_unit(rs)
    return {"status": "answered", "plans": len(rs), "rho": rho, "epsilon": accounting.epsilon(rho, last.delta),
            "unit": unit, "rows_per_patient": k,
            "rho_if_others_collude": alone,
            "delta": last.delta, "rho_total": last.rho_spent_total,
            "epsilon_total": accounting.epsilon(last.rho_spent_total, last.delta),
            "rho_limit": last.rho_limit, "marginals": sum(len(r.summary.marginals) for r in rs)}


def failure_entry(f: SiteFailure, number: int = 1) -> dict[str, Any]:
    refused = f.code not in ("TIMEOUT", "GUARD_TIMEOUT", "GUARD_UNAVAILABLE", "REJECTED", "SUM_INCOMPLETE") \
        and not f.code.startswith("FLOWER_")
    charged = ("yes, for nothing (the masked sum could not be read)" if f.code == "SUM_INCOMPLETE"
               else "no (the guard refused the plan)" if refused else "unknown: check the site's ledger")
    return {"site": f.site, "round": number, "code": f.code, "message": f.message, "charged": charged}


def receipt_entry(r: SiteResult) -> dict[str, Any]:
    rc = r.receipt
    return {"site": r.site, "signer": r.signer, "receipt": keys.b64(r.summary.receipt),
            "signature": keys.b64(r.summary.receipt_signature),
            "plan_id": rc.plan_id, "plan_sha256": rc.plan_sha256.hex(), "rho_debited": rc.rho_debited,
            "rho_spent_total": rc.rho_spent_total, "rho_limit": rc.rho_limit, "delta": rc.delta,
            "debited_at": rc.debited_at, "ledger_seq": rc.ledger_seq,
            "unit": rc.unit, "rows_per_patient": rc.rows_per_patient} | (
                {"parties": rc.parties, "colluding": rc.colluding, "rho_alone": rc.rho_alone} if rc.parties else {})


def aggregates_json(dictionary: Dictionary, syn: Synthesis) -> dict[str, Any]:
    def cells(v: str, g) -> list[str]:
        return syn.groups if v == SITE else group_labels(dictionary[v].cells, g)

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
