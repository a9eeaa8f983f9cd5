"""The coordinator's side of a federated evaluation: plan, send, verify, sum, sign the addendum.

After a release, the coordinator sends every site one signed evaluation plan carrying the release's
records.csv (a public DP output) and asking for noisy counts only (docs/evaluation.md): TSTR score
histograms for declared targets, the unmeasured 2-way tables (pairs no plan of the release
measured), and the distance-to-closest-record histogram with the unique-copies count. Sites debit
it like any plan (default budget: epsilon 0.5 per site at the release's delta). The figures come
from the summed answers; the addendum `evaluations/<id>.json` (+ `.sig`) holds the signed plan,
the signed answers and everything derived from them, and `ppsehr release verify` recomputes it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ...common import accounting, keys
from ...common.dictionary import Dictionary, load_dictionary
from ...common.errors import PpsehrError
from ...common.refusals import MAX_PLAN_BYTES
from ...protos import guard_pb2 as pb
from ..measure import planner
from ..measure.identify import identify
from ..measure.transport import SiteFailure, Transport
from ..release import manifest as mf
from ..release.bundle import verify_release
from . import addendum as ad

MAX_RECORDS_BYTES = 3 * 1024 * 1024  # the guards' limit for records sent with a plan (client/evaluate.py)
# Shares of the evaluation's rho: TSTR histograms, unmeasured tables, distance histogram, unique copies.
SHARES = {"tstr": 0.3, "tables": 0.4, "distance": 0.2, "unique": 0.1}


@dataclass
class EvaluationJob:
    """What the coordinator asks the sites about one release, and at what cost per site."""

    release: str  # the release directory (its addendum is written into evaluations/)
    dictionary: str
    signing_key: str
    site_keys: dict[str, str]
    epsilon: float | None = 0.5
    rho: float | None = None
    targets: list[str] = field(default_factory=list)  # "variable" or "variable=category"; default: binary outcomes
    tables: list[list[str]] = field(default_factory=list)  # unmeasured pairs to ask for; default: the smallest ones
    max_tables: int = 6
    bins: int = 10
    distance: bool = True
    coordinator: str = "coordinator"
    min_sites: int = 1
    wait_sites_timeout: float = 120.0
    reply_timeout: float = 300.0
    plan_lifetime_s: float = 1800.0
    events: str | None = None
    kind: str = "evaluation"

    @property
    def llm(self) -> dict[str, Any]:
        """No LLM step (federation.follow asks a job for its LLM settings to time those steps)."""
        return {}

    def rho_per_site(self, delta: float) -> float:
        try:
            if self.rho is not None:
                accounting.check_rho(self.rho)
                return float(self.rho)
            if self.epsilon is None:
                raise PpsehrError("the evaluation needs a budget: epsilon or rho")
            return accounting.rho_for_epsilon(float(self.epsilon), delta)
        except ValueError as e:
            raise PpsehrError(f"evaluation budget: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "EvaluationJob":
        return cls(**json.loads(Path(path).read_text()))


def measured_pairs(manifest: dict[str, Any]) -> set[frozenset[str]]:
    """Pairs of variables some marginal of the release measured cell by cell. A pair seen only over
    compressed groups of cells (round 2's candidates, say) was not measured at the dictionary's
    resolution: its full table is what an evaluation can add."""
    out = set()
    for p in manifest["plans"]:
        for m in p["marginals"]:
            groups = m.get("groups") or [None] * len(m["variables"])
            names = [v for v, g in zip(m["variables"], groups) if v != "site" and g is None]
            out |= {frozenset(x) for x in itertools.combinations(names, 2)}
    return out


def default_targets(dictionary: Dictionary) -> list[tuple[str, int]]:
    """Binary categorical variables without a missing cell, positive = their second category (at most 2)."""
    out = [(n, 1) for n, v in dictionary.variables.items()
           if v.type == "categorical" and len(v.categories) == 2 and not v.other and not v.missing]
    return out[-2:]


def parse_targets(specs: list[str], dictionary: Dictionary) -> list[tuple[str, int]]:
    out = []
    for spec in specs:
        name, _, positive = spec.partition("=")
        if name not in dictionary.variables or dictionary[name].type != "categorical":
            raise PpsehrError(f"TSTR target {name!r} is not a categorical variable of the dictionary")
        cats = dictionary[name].categories
        if positive and positive not in cats:
            raise PpsehrError(f"TSTR target {name!r} has no category {positive!r} (it has {list(cats)})")
        out.append((name, cats.index(positive) if positive else len(cats) - 1))
    return out


def build_plan(job: EvaluationJob, manifest: dict[str, Any], manifest_bytes: bytes, records: bytes,
               dictionary: Dictionary) -> pb.QueryPlan:
    """The evaluation plan: every choice from public things (the release, the dictionary, the job)."""
    if job.bins < 2 or job.bins > 100 or job.bins % 2:
        raise PpsehrError(f"bins must be even, from 2 to 100, got {job.bins!r}")
    rho = job.rho_per_site(manifest["privacy"]["delta"])
    targets = parse_targets(job.targets, dictionary) if job.targets else default_targets(dictionary)
    measured = measured_pairs(manifest)
    if job.tables:
        tables = [tuple(t) for t in job.tables]
        for t in tables:
            if len(t) != 2 or any(v not in dictionary.variables for v in t) or t[0] == t[1]:
                raise PpsehrError(f"an unmeasured table is a pair of dictionary variables, got {list(t)}")
            if frozenset(t) in measured:
                raise PpsehrError(f"the release measured {list(t)}: it is not an unmeasured table")
    else:
        candidates = [p for p in itertools.combinations(dictionary.names, 2) if frozenset(p) not in measured]
        tables = sorted(candidates, key=lambda p: (dictionary[p[0]].size * dictionary[p[1]].size, p))[:job.max_tables]
    asked = {"tstr": bool(targets), "tables": bool(tables), "distance": job.distance, "unique": job.distance}
    total = sum(SHARES[k] for k, on in asked.items() if on)
    if total == 0:
        raise PpsehrError("the evaluation asks for nothing: no target, no unmeasured table, no distance")
    share = {k: rho * SHARES[k] / total if on else 0.0 for k, on in asked.items()}
    marginals = planner.allocate(dictionary, tables, share["tables"]) if tables else []
    rows = records.count(b"\n") - 1 if records.endswith(b"\n") else records.count(b"\n")
    ev = pb.EvaluationQuery(records_sha256=hashlib.sha256(records).digest(), release_id=manifest["release_id"],
                            manifest_sha256=hashlib.sha256(manifest_bytes).digest(), records=rows,
                            tstr=[pb.TstrQuery(target=t, positive=p, bins=job.bins, rho=share["tstr"] / len(targets))
                                  for t, p in targets])
    if job.distance:
        ev.distance.rho_histogram, ev.distance.rho_unique = share["distance"], share["unique"]
    plan = planner.to_proto(marginals, dictionary, job.coordinator, f"evaluation of release {manifest['release_id']}",
                            job.plan_lifetime_s)
    plan.evaluation.CopyFrom(ev)
    return plan


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_evaluation(job: EvaluationJob, transport: Transport, events: Callable[..., None]) -> dict[str, Any]:
    """Evaluate a release at the sites and write its signed addendum; return the addendum."""
    coordinator_key = keys.load_signing_key(job.signing_key)
    site_keys = {s: keys.load_public_key(p) for s, p in job.site_keys.items()}
    release = Path(job.release)
    pub = release.parent / f".{release.name}.coordinator-{uuid.uuid4().hex[:8]}.pub"
    pub.write_text(keys.public_pem(coordinator_key.public_key()))
    try:  # the release must verify, signed by this coordinator, before anyone is asked anything
        manifest = verify_release(release, coordinator_key=pub)
    finally:
        pub.unlink()
    manifest_bytes = (release / "manifest.json").read_bytes()
    dictionary = load_dictionary(job.dictionary)
    if dictionary.hash != manifest["dictionary"]["hash"]:
        raise PpsehrError(f"{job.dictionary} is not the dictionary of the release (hash). Nothing was sent.")
    records = (release / "records.csv").read_bytes()
    if len(records) > MAX_RECORDS_BYTES:
        raise PpsehrError(f"records.csv has {len(records)} bytes; an evaluation plan carries at most {MAX_RECORDS_BYTES}. "
                          "Nothing was sent.")
    plan = build_plan(job, manifest, manifest_bytes, records, dictionary)
    # free: only sites whose signed identities match the --site-key list are asked (and named as addressees)
    verified = identify(site_keys, dictionary.hash, transport, job.reply_timeout, events)
    plan.addressees.extend(verified.addressees())
    signed = planner.sign_plan(plan, coordinator_key)
    signed.records = records
    if len(signed.SerializeToString()) > MAX_PLAN_BYTES:
        raise PpsehrError("the evaluation plan with its records exceeds the guards' message limit. Nothing was sent.")
    rho = math.fsum(q for q in _plan_rhos(plan))
    events(f"evaluation plan {plan.plan_id}: {len(plan.evaluation.tstr)} TSTR target(s), {len(plan.marginals)} unmeasured "
           f"table(s), distance {'yes' if plan.evaluation.HasField('distance') else 'no'}; rho {rho:.4g} per site "
           f"(epsilon {accounting.epsilon(rho, manifest['privacy']['delta']):.3g})", stage="plan")
    replies, failures = transport.query(signed, job.reply_timeout, events, to=verified.to)
    failures = verified.not_verified() + failures
    answers: list[ad.Answer] = []
    where: dict[str, str] = verified.where  # the transport's name of a sender -> its verified site
    for r in replies:
        try:
            answer = ad.verify_answer(r.signed, plan, signed.plan, dictionary, site_keys)
        except ad.AnswerRejected as e:
            failures.append(SiteFailure(r.where, "REJECTED", f"answer rejected: {e}"))
            continue
        if any(a.site == answer.site for a in answers):
            failures.append(SiteFailure(r.where, "REJECTED", f"a second answer for site {answer.site!r}"))
            continue
        answers.append(answer)
        where[r.where] = answer.site
    if not answers:
        raise PpsehrError("no site answered the evaluation plan: " + "; ".join(f"{f.site}: {f.code} {f.message}" for f in failures))
    excluded = []
    for f in failures:
        site = where.get(f.site) or (f.site if f.site in site_keys else None)
        if site is None or site in {a.site for a in answers} or site in {e.get("site") for e in excluded}:
            excluded.append({"node": f.site, "code": f.code, "message": f.message, "charged": mf.charged_text(f.code, False)})
        else:
            excluded.append({"site": site, "code": f.code, "message": f.message, "charged": mf.charged_text(f.code, False)})
    try:
        add = ad.build(plan, signed, answers, excluded, dictionary, records, manifest, _now(), job.coordinator, site_keys)
    except mf.Inconsistent as e:
        raise PpsehrError(f"no evaluation statement can be made: {e}") from None
    write_addendum(release, add, coordinator_key.sign)
    events(f"evaluation {plan.plan_id}: {len(answers)} site(s) answered ({', '.join(a.site for a in answers)}); addendum "
           f"{ad.DIRECTORY}/{plan.plan_id}.json", stage="done", out=str(release / ad.DIRECTORY / f"{plan.plan_id}.json"))
    return add


def _plan_rhos(plan: pb.QueryPlan) -> list[float]:
    ev = plan.evaluation
    return [m.rho for m in plan.marginals] + [q.rho for q in ev.tstr] + (
        [ev.distance.rho_histogram, ev.distance.rho_unique] if ev.HasField("distance") else [])


def write_addendum(release: Path, addendum: dict[str, Any], sign: Callable[[bytes], bytes]) -> Path:
    """evaluations/<id>.json and .sig, each written whole (temporary file, fsync, rename)."""
    directory = release / ad.DIRECTORY
    directory.mkdir(exist_ok=True)
    data = ad.to_bytes(addendum)
    target = directory / f"{addendum['evaluation_id']}.json"
    for path, content in ((target.with_suffix(".sig"), keys.b64(sign(data)).encode() + b"\n"), (target, data)):
        tmp = release.parent / f".{release.name}.{path.name}.partial"
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    return target

