"""The coordinator's release pipeline: plan -> sites -> aggregate -> model -> records -> release.

Everything after the sites' summaries is post-processing of DP outputs: it reads no raw data
and costs no privacy. The same function runs inside the Flower ServerApp (deployment) and
in-process over DirectTransport (tests, benchmarks).
"""

from __future__ import annotations

import hashlib
import json
import platform
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..common import accounting, keys
from ..common.dictionary import Dictionary, load_dictionary
from ..common.errors import PpsehrError
from . import planner
from .aggregate import SiteResult, SummaryRejected, aggregate, verify_summary
from .model import estimate
from .records import decode, to_csv
from .release import write_release
from .transport import SiteFailure, Transport

PRIVACY_UNIT = "one patient record at one site, added or removed"


@dataclass
class ReleaseJob:
    """What the coordinator asks for. Budget: `epsilon` (at `delta`) or `rho`, per site, for this release."""

    dictionary: str
    out: str
    signing_key: str  # the coordinator's Ed25519 key: signs plans and the release
    site_keys: dict[str, str]  # site -> public key file: which summaries count, and for which site
    epsilon: float | None = 1.0
    rho: float | None = None
    delta: float = 1e-6
    seed: int | None = None
    rows: int | None = None
    coordinator: str = "coordinator"
    purpose: str = "synthetic release"
    min_sites: int = 1
    reply_timeout: float = 300.0
    wait_sites_timeout: float = 120.0
    plan_lifetime_s: float = 1800.0
    events: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def rho_per_site(self) -> float:
        if self.rho is not None:
            accounting.check_rho(self.rho)
            return float(self.rho)
        if self.epsilon is None:
            raise PpsehrError("the release needs a budget: epsilon (with delta) or rho")
        return accounting.rho_for_epsilon(float(self.epsilon), float(self.delta))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ReleaseJob":
        return cls(**json.loads(Path(path).read_text()))


class Events:
    """Progress of a release as JSON lines (read by the coordinator CLI) and/or a callback."""

    def __init__(self, path: str | None = None, echo: Callable[[str], None] | None = None):
        self.path, self.echo = path, echo

    def __call__(self, message: str, stage: str = "progress", **data: Any) -> None:
        if self.echo:
            self.echo(message)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"t": time.time(), "stage": stage, "message": message, **data}) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_release(job: ReleaseJob, transport: Transport, events: Events) -> dict[str, Any]:
    """Run one release end to end and write it to job.out. Returns the manifest."""
    started = _now()
    t0 = time.perf_counter()
    dictionary = load_dictionary(job.dictionary)
    rho = job.rho_per_site()
    coordinator_key = keys.load_signing_key(job.signing_key)
    site_keys = {site: keys.load_public_key(path) for site, path in job.site_keys.items()}
    marginals = planner.one_round_plan(dictionary, rho)
    plan = planner.to_proto(marginals, dictionary, job.coordinator, job.purpose, job.plan_lifetime_s)
    signed_plan = planner.sign_plan(plan, coordinator_key)
    events(f"plan {plan.plan_id}: {len(marginals)} marginals, rho {rho:.4g} per site "
           f"(epsilon {accounting.epsilon(rho, job.delta):.3g} at delta {job.delta:g}), signed by {signed_plan.signer}",
           stage="plan")
    replies, failures = transport.query(signed_plan, job.reply_timeout, events)
    results: list[SiteResult] = []
    for r in replies:
        try:
            result = verify_summary(r.signed, signed_plan, dictionary, site_keys)
        except SummaryRejected as e:
            failures.append(SiteFailure(r.where, "REJECTED", f"summary rejected: {e}"))
            events(f"{r.where}: summary rejected: {e}")
            continue
        if any(x.site == result.site for x in results):
            failures.append(SiteFailure(r.where, "REJECTED", f"a second summary for site {result.site!r}"))
            continue
        results.append(result)
    results.sort(key=lambda r: r.site)
    sites = [r.site for r in results]
    if not results:
        raise PpsehrError("no site answered the plan: " + "; ".join(f"{f.site}: {f.code} {f.message}" for f in failures))
    events(f"{len(results)} site(s) answered with verified signatures: {', '.join(sites)}"
           + (f"; {len(failures)} did not" if failures else ""), stage="aggregate")
    measurements = aggregate(plan, results)
    t_fit = time.perf_counter()
    cliques = planner.structure(dictionary)
    model = estimate(dictionary.domain(), measurements, cliques=[(n,) for n in dictionary.names] + cliques)
    seed = job.seed if job.seed is not None else secrets.randbits(63)
    rng = np.random.default_rng(seed)
    n_rows = job.rows if job.rows is not None else max(1, int(round(model.total)))
    samples = model.sample(n_rows, rng)
    columns = decode(samples, dictionary, rng)
    fit_seconds = time.perf_counter() - t_fit
    events(f"model fitted and {n_rows} records sampled in {fit_seconds:.2f} s", stage="synthesize")
    files = {
        "records.csv": to_csv(columns),
        "aggregates.json": _json(_aggregates(dictionary, measurements)),
        "fidelity.json": _json(_fidelity(dictionary, measurements, samples)),
    }
    manifest = {
        "release_id": plan.plan_id,
        "created": _now(),
        "started": started,
        "dictionary": {"name": dictionary.name, "version": dictionary.version, "hash": dictionary.hash},
        "coordinator": job.coordinator,
        "privacy": _privacy(job, results),
        "sites": {r.site: _site_entry(r) for r in results},
        "sites_not_included": [_failure_entry(f) for f in failures],
        "receipts": [_receipt(r) for r in results],
        "keys": {"coordinator": keys.public_pem(coordinator_key.public_key()),
                 "coordinator_fingerprint": signed_plan.signer,
                 "sites": {r.site: keys.public_pem(site_keys[r.site]) for r in results}},
        "plan": {"plan_id": plan.plan_id, "purpose": plan.purpose, "rho_per_site": rho,
                 "marginals": [{"variables": list(m.variables), "rho": m.rho} for m in marginals],
                 "signed_plan": keys.b64(signed_plan.plan), "signature": keys.b64(signed_plan.signature),
                 "sha256": hashlib.sha256(signed_plan.plan).hexdigest()},
        "generator": {"engine": "ppsehr graphical model (Private-PGM-style estimation, junction-tree sampling)",
                      "cliques": [list(c) for c in model.cliques], "estimated_total": model.total,
                      "rows": n_rows, "seed": seed, "fit_seconds": round(fit_seconds, 3),
                      "python": platform.python_version()},
        "llm": {"used": False, "reason": "no LLM endpoint configured; records come from the statistical engine alone"},
    }
    out = write_release(job.out, files, manifest, sign=coordinator_key.sign)
    events(f"release written to {out} in {time.perf_counter() - t0:.1f} s", stage="done", out=str(out))
    return manifest


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1).encode() + b"\n"


def _privacy(job: ReleaseJob, results: list[SiteResult]) -> dict[str, Any]:
    rho = max(r.receipt.rho_debited for r in results)
    eps = accounting.epsilon(rho, job.delta)
    return {
        "unit": PRIVACY_UNIT,
        "model": "zero-concentrated DP per site; rho composes additively across releases",
        "delta": job.delta,
        "release_rho_max": rho,
        "release_epsilon_max": eps,
        "statement": (f"Each patient is protected by the budget of the site that holds them. In this release no "
                      f"site spent more than rho = {rho:.4g}, i.e. ({eps:.3g}, {job.delta:g})-DP. "
                      "If a patient appears at k sites, their loss is at most the sum over those sites. "
                      "Epsilon is OpenDP's zCDP-to-approximate-DP privacy profile; each site's rho is in its signed receipt."),
    }


def _site_entry(r: SiteResult) -> dict[str, Any]:
    rc = r.receipt
    return {"status": "answered", "rho": rc.rho_debited, "epsilon": accounting.epsilon(rc.rho_debited, rc.delta),
            "delta": rc.delta, "rho_total": rc.rho_spent_total, "epsilon_total": accounting.epsilon(rc.rho_spent_total, rc.delta),
            "rho_limit": rc.rho_limit, "marginals": len(r.summary.marginals)}


def _failure_entry(f: SiteFailure) -> dict[str, Any]:
    refused = f.code not in ("TIMEOUT", "GUARD_TIMEOUT", "GUARD_UNAVAILABLE", "REJECTED") and not f.code.startswith("FLOWER_")
    return {"site": f.site, "code": f.code, "message": f.message,
            "charged": "no (the guard refused the plan)" if refused else "unknown: check the site's ledger"}


def _receipt(r: SiteResult) -> dict[str, Any]:
    rc = r.receipt
    return {"site": r.site, "signer": r.signer, "receipt": keys.b64(r.summary.receipt),
            "signature": keys.b64(r.summary.receipt_signature),
            "plan_id": rc.plan_id, "plan_sha256": rc.plan_sha256.hex(), "rho_debited": rc.rho_debited,
            "rho_spent_total": rc.rho_spent_total, "rho_limit": rc.rho_limit, "delta": rc.delta,
            "debited_at": rc.debited_at, "ledger_seq": rc.ledger_seq}


def _aggregates(dictionary: Dictionary, measurements) -> dict[str, Any]:
    return {"note": "sums of the sites' noisy marginals (DP outputs); variance is the noise variance of every cell",
            "marginals": [{"variables": list(m.variables), "cells": [list(dictionary[v].cells) for v in m.variables],
                           "counts": m.values.ravel().tolist(), "variance": m.variance} for m in measurements]}


def _fidelity(dictionary: Dictionary, measurements, samples: np.ndarray) -> dict[str, Any]:
    """Total variation distance between the records and each DP aggregate (clipped, normalised)."""
    index = {n: j for j, n in enumerate(dictionary.names)}
    rows = []
    for m in measurements:
        shape = m.values.shape
        flat = np.ravel_multi_index([samples[:, index[v]] for v in m.variables], shape)
        synth = np.bincount(flat, minlength=int(np.prod(shape))) / max(len(samples), 1)
        target = np.clip(m.values.ravel(), 0, None)
        target = target / target.sum() if target.sum() > 0 else np.full_like(target, 1 / target.size)
        rows.append({"variables": list(m.variables), "tvd": float(0.5 * np.abs(synth - target).sum())})
    by_width: dict[int, list[float]] = {}
    for r in rows:
        by_width.setdefault(len(r["variables"]), []).append(r["tvd"])
    return {"note": "TVD between the synthetic records and the noisy DP aggregates they were fitted to (no raw data used)",
            "mean_tvd_by_width": {str(k): float(np.mean(v)) for k, v in sorted(by_width.items())}, "marginals": rows}
