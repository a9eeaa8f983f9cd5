"""The coordinator's release pipeline: plan -> sites -> aggregate -> model -> records -> release.

Everything after the sites' summaries is post-processing of DP outputs: it reads no raw data
and costs no privacy. The same function runs inside the Flower ServerApp (deployment) and
in-process over DirectTransport (tests, benchmarks).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..common import accounting, keys, secagg
from ..common.cells import group_labels
from ..common.dictionary import Dictionary, load_dictionary
from ..common.errors import PpsehrError
from . import planner
from ..protos import guard_pb2 as pb
from .aggregate import SITE, SiteResult, SummaryRejected, aggregate, pooled, verify_summary
from .exports import FORMATS as EXPORT_FORMATS
from .exports import export_files
from .llm_stage import LLMConfig, encode, knowledge_dependencies, run_llm_stage
from .model import JunctionTree, Measurement, Model, estimate
from .report import build_report
from .records import decode, to_csv
from .release import write_release
from .transport import SiteFailure, Transport

PRIVACY_UNIT = "one patient record at one site, added or removed"
SITE_MODES = ("model", "release", "pooled")


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
    strategy: str = "dictionary"  # planner.STRATEGIES
    select_fraction: float = 0.2  # adaptive: share of rho spent on round-1 candidates
    compress: bool = True  # joint tables over domains compressed by an earlier round's 1-way counts
    # dictionary strategy with compress: share of rho for the round-1 1-way tables (None: `round1_share`)
    oneway_fraction: float | None = None
    structure: list[list[str]] = field(default_factory=list)  # extra known dependencies for the one-round plan
    site_variable: str = "model"  # SITE_MODES: site effects modelled (records pooled) / kept in records / summed away
    site_groups: dict[str, str] = field(default_factory=dict)  # site -> group label (default: each site its own)
    secure_aggregation: bool = False  # round 2 (every round, if pooled) as masked sums: noise of one site, not K
    colluding: int = 0  # secure: sites that may collude with the coordinator (their noise is not counted)
    min_parties: int = 3  # secure: a masked sum needs at least this many sites
    formats: list[str] = field(default_factory=lambda: list(EXPORT_FORMATS))  # record formats besides the manifest
    report: bool = True  # report.html + figures/
    llm: dict[str, Any] = field(default_factory=dict)  # LLMConfig.to_dict(); empty: statistical engine only
    extra: dict[str, Any] = field(default_factory=dict)

    def rho_per_site(self) -> float:
        if self.rho is not None:
            accounting.check_rho(self.rho)
            return float(self.rho)
        if self.epsilon is None:
            raise PpsehrError("the release needs a budget: epsilon (with delta) or rho")
        return accounting.rho_for_epsilon(float(self.epsilon), float(self.delta))

    def validate(self) -> float:
        """Check every option before anything is sent (a bad job must cost no site any budget); return rho."""
        if self.strategy not in planner.STRATEGIES:
            raise PpsehrError(f"strategy must be one of {planner.STRATEGIES}, got {self.strategy!r}")
        if self.site_variable not in SITE_MODES:
            raise PpsehrError(f"site_variable must be one of {SITE_MODES}, got {self.site_variable!r}")
        for name in ("select_fraction", "oneway_fraction"):
            value = getattr(self, name)
            if value is None and name == "oneway_fraction":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise PpsehrError(f"{name} must be a number between 0 and 1, got {value!r}")
        for name in ("compress", "secure_aggregation"):
            if not isinstance(getattr(self, name), bool):
                raise PpsehrError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, low in (("colluding", 0), ("min_parties", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PpsehrError(f"{name} must be an integer of at least {low}, got {value!r}")
        if self.colluding >= self.min_parties:
            raise PpsehrError(f"colluding ({self.colluding}) must be below min_parties ({self.min_parties}): "
                              "someone's noise must count")
        if (self.secure_aggregation and self.site_variable != "pooled" and self.strategy == "dictionary"
                and not self.compress):
            raise PpsehrError("secure aggregation with site effects modelled secures the joint-table round, and "
                              "--no-compress has only one round: compress, or use site_variable = 'pooled'")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise PpsehrError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in self.site_groups.items()):
            raise PpsehrError(f"site_groups must map site names to non-empty group names, got {self.site_groups!r}")
        unknown = sorted(set(self.formats) - set(EXPORT_FORMATS))
        if unknown or "csv" not in self.formats:
            raise PpsehrError(f"formats must include csv and be among {EXPORT_FORMATS}, got {self.formats!r}")
        self.llm_config().check()
        if self.rows is not None and not 1 <= self.rows <= 100_000_000:
            raise PpsehrError(f"rows must be between 1 and 100,000,000, got {self.rows!r}")
        try:
            accounting.check_delta(self.delta)
            return self.rho_per_site()
        except ValueError as e:
            raise PpsehrError(f"budget: {e}") from None

    def round1_share(self) -> float:
        """Dictionary strategy with compression: the share of rho for round 1's 1-way tables.

        0.85 by default: the 1-way tables carry every clique and, per site, the site effects. With
        secure aggregation and site effects modelled, round 2 measures the 1-way tables again as
        secure sums (pooled, one site's noise) next to the joint tables, and round 1's per-site
        tables only need to carry the site effects: 0.5 (0.3 / 0.5 / 0.7 measured 0.140 / 0.138 /
        0.138 mean 2-way TVD at epsilon 1 and 0.082 / 0.081 / 0.083 at epsilon 4 on the demo,
        10 repetitions each)."""
        if self.oneway_fraction is not None:
            return float(self.oneway_fraction)
        return 0.5 if self.secure_aggregation and self.site_variable != "pooled" else 0.85

    def llm_config(self) -> LLMConfig:
        return LLMConfig.from_dict(self.llm) if self.llm else LLMConfig()

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


@dataclass
class Round:
    """One signed plan sent to every site, and what came back (verified summaries, failures)."""

    number: int
    marginals: list[planner.PlannedMarginal]
    plan: pb.QueryPlan
    signed: pb.SignedPlan
    results: list[SiteResult]
    failures: list[SiteFailure]

    @property
    def secure(self) -> bool:
        return self.plan.HasField("secure")


@dataclass
class Synthesis:
    """The model fitted to the DP aggregates and the records sampled from it (post-processing only)."""

    measurements: list[Measurement]  # what the model was fitted to (with a `site` axis if site effects are modelled)
    pooled: list[Measurement]  # the same, summed over sites: what fidelity and reports compare against
    model: Model
    samples: np.ndarray  # (n, V) cell indices, columns in dictionary order
    site_labels: list[str] | None  # the sampled site (group) of each record, when site is a model variable
    groups: list[str]
    seconds: float


def measure(number: int, marginals: list[planner.PlannedMarginal], job: ReleaseJob, dictionary: Dictionary,
            coordinator_key, site_keys, transport: Transport, events: Events, secure: bool = False,
            cover: set[str] | None = None) -> Round:
    """Sign one plan, send it to every site, keep the summaries whose signatures and receipts verify.

    A secure plan goes out twice: to enroll (the sites check it, debit nothing and return signed
    one-time keys), then with the roster of enrolled keys, to be answered. Its masked sum can be
    read only if every enrolled site answers; otherwise the round counts as unanswered, and the
    sites that did answer are listed as charged for nothing. With `cover` (round 1's sites), a
    secure sum must cover exactly those sites, since it cannot be cut down to fit round 1's tables:
    others are left out of the roster, and if one of them did not enroll the plan is not sent to
    be answered (nothing is debited).
    """
    plan = planner.to_proto(marginals, dictionary, job.coordinator, f"{job.purpose} (round {number})", job.plan_lifetime_s)
    if secure:
        plan.secure.colluding, plan.secure.min_parties = job.colluding, job.min_parties
    signed = planner.sign_plan(plan, coordinator_key)
    rho = sum(m.rho for m in marginals)
    events(f"round {number}: plan {plan.plan_id} with {len(marginals)} marginals, rho {rho:.4g} per site, "
           f"signed by {signed.signer}" + (" (secure aggregation)" if secure else ""), stage="plan")
    failures: list[SiteFailure] = []
    to = None
    if secure:
        roster, to, failures = _enroll(signed, job, site_keys, transport, events, cover)
        need = max([job.min_parties] + [k.min_parties for k in roster])
        absent = sorted((cover or set()) - {k.site for k in roster})
        if absent or len(roster) < need:
            events(f"round {number}: " + (f"the secure sum must cover every round-1 site, and {', '.join(absent)} "
                   "cannot be in it" if absent else f"{len(roster)} site(s) in the secure sum, {need} needed")
                   + "; nothing was sent to answer (nothing was debited): "
                   + "; ".join(f"{f.site}: {f.code}" for f in failures))
            return Round(number, marginals, plan, signed, [], failures)
        signed.roster.extend(roster)
        events(f"round {number}: {len(roster)} site(s) enrolled for the secure sum: {', '.join(s.site for s in roster)}")
    replies, more = transport.query(signed, job.reply_timeout, events, to=to)
    failures += more
    results: list[SiteResult] = []
    for r in replies:
        try:
            result = verify_summary(r.signed, signed, dictionary, site_keys)
        except SummaryRejected as e:
            failures.append(SiteFailure(r.where, "REJECTED", f"summary rejected: {e}"))
            events(f"{r.where}: summary rejected: {e}")
            continue
        if any(x.site == result.site for x in results):
            failures.append(SiteFailure(r.where, "REJECTED", f"a second summary for site {result.site!r}"))
            continue
        results.append(result)
    results.sort(key=lambda x: x.site)
    missing = sorted({s.site for s in signed.roster} - {r.site for r in results})
    if secure and results and missing:
        failures += [SiteFailure(r.site, "SUM_INCOMPLETE", f"answered and was charged rho {r.receipt.rho_debited:.4g} for "
                                 f"nothing: the masked sum needs every enrolled site, and {', '.join(missing)} did not answer")
                     for r in results]
        results = []
    if not results:
        events(f"round {number}: no usable answers: " + "; ".join(f"{f.site}: {f.code}" for f in failures))
        return Round(number, marginals, plan, signed, results, failures)
    events(f"round {number}: {len(results)} site(s) answered with verified signatures: "
           f"{', '.join(x.site for x in results)}" + (f"; {len(failures)} did not" if failures else ""), stage="aggregate")
    return Round(number, marginals, plan, signed, results, failures)


def _enroll(signed: pb.SignedPlan, job: ReleaseJob, site_keys, transport: Transport, events: Events,
            cover: set[str] | None) -> tuple[list[pb.KeyShare], set[str], list[SiteFailure]]:
    """Secure plans: collect the sites' signed one-time keys and pick the roster: sites known to the
    coordinator (and in `cover`, if given) that all accept each other (`secagg.agreeing`).
    Returns the roster, where to send the answer round (the transport's names of its members) and
    the failures."""
    replies, failures = transport.query(signed, job.reply_timeout, events, kind="enroll")
    plan_sha = hashlib.sha256(signed.plan).digest()
    shares: dict[str, pb.KeyShare] = {}
    where: dict[str, str] = {}
    for r in replies:
        try:
            site = secagg.check_share(r.signed, plan_sha, site_keys)
        except secagg.RosterError as e:
            failures.append(SiteFailure(r.where, "REJECTED", f"key share rejected: {e}"))
            continue
        if site in shares:
            failures.append(SiteFailure(r.where, "REJECTED", f"a second key share for site {site!r}"))
            continue
        if cover is not None and site not in cover:
            failures.append(SiteFailure(site, "NOT_IN_ROSTER", "left out of the secure sum: it did not answer round 1 "
                                        "(not charged)"))
            continue
        shares[site], where[site] = r.signed, r.where
    roster = secagg.agreeing(shares)
    failures += [SiteFailure(s, "NOT_IN_ROSTER", "left out of the secure sum: its peers or min_parties do not fit the "
                             "other enrolled sites' (not charged)") for s in sorted(set(shares) - set(roster))]
    return [shares[s] for s in roster], {where[s] for s in roster}, failures


def collect(job: ReleaseJob, dictionary: Dictionary, coordinator_key, site_keys, transport: Transport,
            events: Events) -> tuple[list[Round], list[tuple[str, ...]]]:
    """Run the job's measurement strategy; return the rounds and the model's structure (variable sets).

    Every plan's model is sized before it is sent, so a plan the coordinator could not fit never
    costs a site anything. Round 1 must be answered by someone; if round 2 is answered by no one
    (sites down, or over their budget after round 1), round 1 is already paid for, so the release
    goes ahead on round 1's tables within the structure, and the manifest lists the refusals.
    """
    rho = job.validate()
    events(f"budget: rho {rho:.4g} per site (epsilon {accounting.epsilon(rho, job.delta):.3g} at delta {job.delta:g}), "
           f"strategy {job.strategy}", stage="plan")
    args = (job, dictionary, coordinator_key, site_keys, transport, events)
    # Secure aggregation: round 2 is a masked sum; round 1 (or a single round) is too, unless it must
    # stay per site because site effects are modelled from it (then round 2 re-measures the 1-way tables).
    secure_first = job.secure_aggregation and job.site_variable == "pooled"
    if job.strategy == "dictionary":
        extra = [tuple(x) for x in job.structure]
        llm = job.llm_config()
        if llm.enabled and "knowledge" in llm.uses:  # clinical prior from the public dictionary: costs no privacy
            extra += knowledge_dependencies(llm, dictionary, events)
        plan = planner.one_round_plan(dictionary, rho, extra)
        structure = [m.variables for m in plan]
        check_model_size(job, dictionary, structure)
        joint = [s for s in structure if len(s) > 1]
        if not job.compress or not joint:
            return [_answered(measure(1, plan, *args, secure=secure_first))], structure
        oneway = [(n,) for n in dictionary.names]
        share = job.round1_share()
        first = _answered(measure(1, planner.allocate(dictionary, oneway, rho * share), *args, secure=secure_first))
        summed = aggregate(first.plan, first.results, dictionary)
        rho_joint = rho * (1 - share)
        if job.secure_aggregation and not secure_first:  # pooled 1-way tables as secure sums, beside the per-site ones
            joint = oneway + joint
    else:
        if len(dictionary.names) < 2:
            raise PpsehrError("the adaptive strategy selects pairs: the dictionary needs at least 2 variables. Nothing was sent.")
        first = _answered(measure(1, planner.candidate_plan(dictionary, rho * job.select_fraction), *args, secure=secure_first))
        summed = aggregate(first.plan, first.results, dictionary)
        joint = planner.selected_pairs(dictionary, summed, lambda sets: model_clique(job, dictionary, sets)[1])
        structure = [(n,) for n in dictionary.names] + joint
        check_model_size(job, dictionary, structure)
        events(f"selected {len(joint)} pairs from the round-1 candidates ({len(dictionary.names) - 1} in the spanning tree): "
               + ", ".join("-".join(p) for p in joint),
               stage="plan")
        joint = [(n,) for n in dictionary.names] + joint  # round 2 re-measures the 1-way tables too
        rho_joint = rho * (1 - job.select_fraction)
    if job.compress:
        n = len(first.results)
        noise_copies = n / max(1, n - job.colluding) if job.secure_aggregation else n
        second = planner.compressed_plan(dictionary, joint, summed, rho_joint, noise_copies)
        events("domains compressed by the round-1 1-way counts: " + ", ".join(
            f"{'-'.join(m.variables)} {m.cells(dictionary)} cells" for m in second if len(m.variables) > 1), stage="plan")
    else:
        second = planner.allocate(dictionary, joint, rho_joint)
    rounds = [first, measure(2, second, *args, secure=job.secure_aggregation, cover={r.site for r in first.results})]
    if not rounds[1].results:
        events("round 2 was answered by no site: the release uses round 1's tables only "
               + ("(1-way tables: no joint structure)" if job.strategy == "dictionary" else "within the selected tree")
               + "; " + "; ".join(f"{f.site}: {f.code}" for f in rounds[1].failures))
    return rounds, structure


def _answered(rnd: Round) -> Round:
    if not rnd.results:
        raise PpsehrError(f"no site answered the round-{rnd.number} plan: "
                          + "; ".join(f"{f.site}: {f.code} {f.message}" for f in rnd.failures))
    return rnd


MAX_MODEL_CELLS = 2_000_000  # largest clique table a release will fit (the estimator's hard limit is higher)


def model_clique(job: ReleaseJob, dictionary: Dictionary, structure: list[tuple[str, ...]]) -> tuple[tuple[str, ...], int]:
    """The largest clique (with the `site` axis, if modelled) of the model a structure needs, and its cells."""
    domain = dictionary.domain()
    if job.site_variable != "pooled":
        domain = {SITE: max(1, len({job.site_groups.get(s, s) for s in job.site_keys}))} | domain
    sets = [((SITE,) if SITE in domain else ()) + tuple(v) for v in structure]
    tree = JunctionTree(domain, sets)
    biggest = max(tree.cliques, key=lambda c: math.prod(tree.shape(c)))
    return biggest, math.prod(tree.shape(biggest))


def check_model_size(job: ReleaseJob, dictionary: Dictionary, structure: list[tuple[str, ...]]) -> None:
    """Refuse, before anything is sent, a structure whose junction tree has a clique table too large to fit."""
    biggest, cells = model_clique(job, dictionary, structure)
    if cells > MAX_MODEL_CELLS:
        raise PpsehrError(f"the planned marginals need a model clique over {list(biggest)} with {cells:,} cells "
                          f"(limit {MAX_MODEL_CELLS:,}); declare fewer or smaller dependencies. Nothing was sent.")


def synthesize(dictionary: Dictionary, rounds: list[Round], structure: list[tuple[str, ...]], site_variable: str,
               site_groups: dict[str, str], rows: int | None, rng: np.random.Generator) -> Synthesis:
    """Aggregate every answered round, fit the graphical model on `structure`, sample records.

    Reads DP outputs only. Tables outside the structure (adaptive round-1 candidates) informed the
    selection only, as in MST. Secure rounds arrive as pooled sums, also when site effects are
    modelled (the model's site axis then comes from round 1's per-site tables).
    """
    t0 = time.perf_counter()
    answered = [rnd for rnd in rounds if rnd.results]
    sites = sorted({r.site for rnd in answered for r in rnd.results})
    if site_variable == "pooled":
        # pooled sums must cover the same sites in every round, or totals would disagree
        common = set.intersection(*({r.site for r in rnd.results} for rnd in answered))
        if not common:  # no site answered every round: pool round 1 alone
            answered, common = answered[:1], {r.site for r in answered[0].results}
        measurements = [m for rnd in answered for m in aggregate(rnd.plan, [r for r in rnd.results if r.site in common], dictionary)]
        groups: dict[str, str] = {}
    else:
        if SITE in dictionary.variables:
            raise PpsehrError(f"the dictionary has a variable named {SITE!r}; use site_variable = 'pooled'")
        groups = {s: site_groups.get(s, s) for s in sites}
        measurements = [m for rnd in answered for m in aggregate(rnd.plan, rnd.results, dictionary, None if rnd.secure else groups)]
    sets = [set(v) for v in structure]
    measurements = [m for m in measurements if np.any(m.weights() > 0)
                    and any(set(m.variables) - {SITE} <= s for s in sets)]
    labels = sorted(set(groups.values()))
    domain = ({SITE: len(labels)} if groups else {}) | dictionary.domain()
    model = estimate(domain, measurements,
                     total=_total_by_slice([m for m in measurements if m.variables[:1] == (SITE,)]) if groups else None)
    n = rows if rows is not None else max(1, int(round(model.total)))
    samples = model.sample(n, rng)
    site_labels = None
    if groups:
        site_labels = [labels[i] for i in samples[:, 0]]
        samples = samples[:, 1:]
    return Synthesis(measurements, pooled(measurements), model, samples, site_labels, labels, time.perf_counter() - t0)


def _full_domain(syn: Synthesis) -> list[Measurement]:
    """The pooled measurements, each compressed table replaced by the fitted model's marginal over
    its variables (post-processing of DP outputs, same noise variance), for stages that work in
    dictionary cells (the LLM stage)."""
    return [Measurement(m.variables, syn.model.marginal(m.variables), m.variance) if m.coarse else m for m in syn.pooled]


def _total_by_slice(measurements: list[Measurement]) -> float:
    """Record total from tables with a leading site axis: per slice the inverse-variance mean of its
    observed sums, added over slices (a group that missed some rounds still counts)."""
    slices: dict[int, tuple[float, float]] = {}  # slice -> (sum of w * total, sum of w)
    for m in measurements:
        var = np.broadcast_to(m.variance, m.values.shape)
        for g in range(m.values.shape[0]):
            if np.all(np.isfinite(var[g])):
                w = 1.0 / float(var[g].sum())
                a, b = slices.get(g, (0.0, 0.0))
                slices[g] = (a + w * float(m.values[g].sum()), b + w)
    return max(1.0, sum(a / b for a, b in slices.values()))


def run_release(job: ReleaseJob, transport: Transport, events: Events) -> dict[str, Any]:
    """Run one release end to end and write it to job.out. Returns the manifest."""
    started = _now()
    t0 = time.perf_counter()
    job.validate()
    dictionary = load_dictionary(job.dictionary)
    if job.site_variable != "pooled" and SITE in dictionary.variables:
        raise PpsehrError(f"the dictionary has a variable named {SITE!r}; use site_variable = 'pooled'")
    coordinator_key = keys.load_signing_key(job.signing_key)
    site_keys = {site: keys.load_public_key(path) for site, path in job.site_keys.items()}
    if Path(job.out).exists():
        raise PpsehrError(f"{job.out} already exists; choose a new output directory. Nothing was sent.")
    rounds, structure = collect(job, dictionary, coordinator_key, site_keys, transport, events)
    seed = job.seed if job.seed is not None else secrets.randbits(63)
    rng = np.random.default_rng(seed)
    syn = synthesize(dictionary, rounds, structure, job.site_variable, job.site_groups, job.rows, rng)
    events(f"model fitted and {len(syn.samples)} records sampled in {syn.seconds:.2f} s", stage="synthesize")
    columns = decode(syn.samples, dictionary, rng)
    llm = run_llm_stage(job.llm_config(), dictionary, _full_domain(syn), columns, rng, events)
    samples = syn.samples
    if llm.columns is not columns:  # repaired or LLM-first records: fidelity and report follow what is released
        columns, samples = llm.columns, encode(dictionary, llm.columns)
    release_id = uuid.uuid4().hex
    results = [r for rnd in rounds for r in rnd.results]
    sites = sorted({r.site for r in results})
    answered = {s: [r for r in results if r.site == s] for s in sites}
    fidelity = _fidelity(dictionary, syn.pooled, samples)
    records = ({SITE: syn.site_labels} | columns) if job.site_variable == "release" and syn.site_labels else columns
    files = {
        "records.csv": to_csv(records),
        "aggregates.json": _json(_aggregates(dictionary, syn)),
        "fidelity.json": _json(fidelity),
        **llm.files,
    }
    events(f"exporting records as {', '.join(job.formats)}", stage="export")
    files |= export_files(dictionary, columns, release_id, set(job.formats))
    manifest = {
        "release_id": release_id,
        "created": _now(),
        "started": started,
        "dictionary": {"name": dictionary.name, "version": dictionary.version, "hash": dictionary.hash},
        "coordinator": job.coordinator,
        "privacy": _privacy(job, answered, rounds),
        "sites": {s: _site_entry(rs) for s, rs in answered.items()},
        "sites_not_included": [_failure_entry(f) for f in rounds[0].failures],
        "receipts": [_receipt(r) for r in results],
        "keys": {"coordinator": keys.public_pem(coordinator_key.public_key()),
                 "coordinator_fingerprint": rounds[0].signed.signer,
                 "sites": {s: keys.public_pem(site_keys[s])
                           for s in sorted(set(sites) | {k.site for rnd in rounds for k in rnd.signed.roster})}},
        "plans": [_plan_entry(rnd) for rnd in rounds],
        "generator": {"engine": "ppsehr graphical model (Private-PGM-style estimation on a junction tree)",
                      "strategy": job.strategy, "compress": job.compress, "site_variable": job.site_variable,
                      "site_groups": syn.groups, "cliques": [list(c) for c in syn.model.cliques],
                      "estimated_total": syn.model.total, "rows": len(samples), "seed": seed,
                      "fit_seconds": round(syn.seconds, 3), "python": platform.python_version(),
                      "formats": list(job.formats)},
        "llm": llm.manifest_section,
    }
    for rnd in rounds[1:]:
        manifest["sites_not_included"] += [_failure_entry(f, rnd.number) for f in rnd.failures]
    if job.report:
        events("building the report", stage="report")
        files |= build_report(dictionary, manifest, syn.pooled, samples, fidelity)
    out = write_release(job.out, files, manifest, sign=coordinator_key.sign)
    events(f"release written to {out} in {time.perf_counter() - t0:.1f} s", stage="done", out=str(out))
    return manifest


def _plan_entry(rnd: Round) -> dict[str, Any]:
    return {"round": rnd.number, "plan_id": rnd.plan.plan_id, "purpose": rnd.plan.purpose,
            "rho_per_site": sum(m.rho for m in rnd.marginals),
            "marginals": [{"variables": list(m.variables), "rho": m.rho} | _groups_entry(m.groups) for m in rnd.marginals],
            "signed_plan": keys.b64(rnd.signed.plan), "signature": keys.b64(rnd.signed.signature),
            "sha256": hashlib.sha256(rnd.signed.plan).hexdigest()} | ({"secure": {
                "colluding": rnd.plan.secure.colluding, "min_parties": rnd.plan.secure.min_parties,
                "roster": [{"site": k.site, "public_key": keys.b64(k.public_key), "signature": keys.b64(k.signature),
                            "signer": k.signer} for k in rnd.signed.roster]}} if rnd.secure else {})


def _groups_entry(groups) -> dict[str, Any]:
    """A compressed marginal's groupings for the manifest and aggregates.json (nothing if none)."""
    if groups is None or all(g is None for g in groups):
        return {}
    return {"groups": [None if g is None else [int(x) for x in g] for g in groups]}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1).encode() + b"\n"


def _privacy(job: ReleaseJob, answered: dict[str, list[SiteResult]], rounds: list[Round]) -> dict[str, Any]:
    rho = max(sum(r.receipt.rho_debited for r in rs) for rs in answered.values())
    eps = accounting.epsilon(rho, job.delta)
    secure = [rnd for rnd in rounds if rnd.secure]
    trust = {"secure_aggregation": (
        f"Round(s) {', '.join(str(rnd.number) for rnd in secure)} were secure sums: each site masked its tables and "
        "added a share of the noise, and only the sum over every enrolled site could be read. Their rho counts on "
        f"at most {job.colluding} enrolled site(s) colluding with the coordinator (Kairouz, Liu & Steinke's distributed "
        "discrete Gaussian bound); each site's rho_if_others_collude is its loss if all the other sites did.")} if secure else {}
    return trust | {
        "unit": PRIVACY_UNIT,
        "model": "zero-concentrated DP per site; rho composes additively across plans and releases",
        "delta": job.delta,
        "release_rho_max": rho,
        "release_epsilon_max": eps,
        "statement": (f"Each patient is protected by the budget of the site that holds them. In this release no "
                      f"site spent more than rho = {rho:.4g}, i.e. ({eps:.3g}, {job.delta:g})-DP. "
                      "If a patient appears at k sites, their loss is at most the sum over those sites. "
                      "Epsilon is OpenDP's zCDP-to-approximate-DP privacy profile; each site's rho is in its signed receipts."),
    }


def _site_entry(rs: list[SiteResult]) -> dict[str, Any]:
    last = max((r.receipt for r in rs), key=lambda rc: rc.ledger_seq)
    rho = sum(r.receipt.rho_debited for r in rs)
    alone = math.fsum(r.receipt.rho_alone if r.receipt.parties else r.receipt.rho_debited for r in rs)
    return {"status": "answered", "plans": len(rs), "rho": rho, "epsilon": accounting.epsilon(rho, last.delta),
            "rho_if_others_collude": alone,
            "delta": last.delta, "rho_total": last.rho_spent_total,
            "epsilon_total": accounting.epsilon(last.rho_spent_total, last.delta),
            "rho_limit": last.rho_limit, "marginals": sum(len(r.summary.marginals) for r in rs)}


def _failure_entry(f: SiteFailure, number: int = 1) -> dict[str, Any]:
    refused = f.code not in ("TIMEOUT", "GUARD_TIMEOUT", "GUARD_UNAVAILABLE", "REJECTED", "SUM_INCOMPLETE") \
        and not f.code.startswith("FLOWER_")
    charged = ("yes, for nothing (the masked sum could not be read)" if f.code == "SUM_INCOMPLETE"
               else "no (the guard refused the plan)" if refused else "unknown: check the site's ledger")
    return {"site": f.site, "round": number, "code": f.code, "message": f.message, "charged": charged}


def _receipt(r: SiteResult) -> dict[str, Any]:
    rc = r.receipt
    return {"site": r.site, "signer": r.signer, "receipt": keys.b64(r.summary.receipt),
            "signature": keys.b64(r.summary.receipt_signature),
            "plan_id": rc.plan_id, "plan_sha256": rc.plan_sha256.hex(), "rho_debited": rc.rho_debited,
            "rho_spent_total": rc.rho_spent_total, "rho_limit": rc.rho_limit, "delta": rc.delta,
            "debited_at": rc.debited_at, "ledger_seq": rc.ledger_seq} | (
                {"parties": rc.parties, "colluding": rc.colluding, "rho_alone": rc.rho_alone} if rc.parties else {})


def _aggregates(dictionary: Dictionary, syn: Synthesis) -> dict[str, Any]:
    def cells(v: str, g) -> list[str]:
        return syn.groups if v == SITE else group_labels(dictionary[v].cells, g)

    return {"note": "the sites' noisy marginals (DP outputs), summed per site group when `site` is a variable; "
                    "variance is the noise variance of each cell (null: not observed); `groups` (compressed "
                    "tables): per variable, the group of each dictionary cell",
            "marginals": [{"variables": list(m.variables), "cells": [cells(v, g) for v, g in zip(m.variables, m.maps())],
                           **_groups_entry(m.groups),
                           "counts": m.values.ravel().tolist(),
                           "variance": [None if not math.isfinite(x) else x
                                        for x in np.broadcast_to(m.variance, m.values.shape).ravel().tolist()]}
                          for m in syn.measurements]}


def _fidelity(dictionary: Dictionary, measurements, samples: np.ndarray) -> dict[str, Any]:
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
