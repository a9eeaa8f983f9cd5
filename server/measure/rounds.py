"""Measurement: signed plans to every site, in rounds, and the verified summaries that come back.

`collect` runs a measurement strategy (one or two Flower rounds) and returns the rounds and the
model's structure. Every plan's model is sized before it is sent, so a plan the coordinator
could not fit never costs a site anything.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from ...common import accounting, secagg
from ...common.dictionary import Dictionary
from ...common.errors import PpsehrError
from ...protos import guard_pb2 as pb
from ..model.graphical import SITE, JunctionTree, Measurement
from . import planner
from .aggregate import SiteResult, SummaryRejected, aggregate, verify_summary
from .transport import SiteFailure, Transport

Progress = Callable[..., None]  # progress(message, stage=..., **data): pipeline.Events
SITE_MODES = ("model", "release", "pooled")
MAX_MODEL_CELLS = 2_000_000  # largest clique table a release will fit (the estimator's hard limit is higher)


@dataclass(frozen=True)
class Request:
    """Who asks, for what, and at what cost per site (fixed by the release's budget)."""

    coordinator: str
    purpose: str
    rho: float
    delta: float


@dataclass
class MeasureOptions:
    """The measurement stage's settings: what to ask the sites, in how many rounds, how summed."""

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
    reply_timeout: float = 300.0
    plan_lifetime_s: float = 1800.0

    def validate(self) -> None:
        """Check every option before anything is sent (a bad job must cost no site any budget)."""
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
        if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in self.site_groups.items()):
            raise PpsehrError(f"site_groups must map site names to non-empty group names, got {self.site_groups!r}")

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


@dataclass
class Round:
    """One signed plan sent to every site, and what came back (verified summaries, failures)."""

    number: int
    marginals: list[planner.PlannedMarginal]
    plan: pb.QueryPlan
    signed: pb.SignedPlan
    results: list[SiteResult]
    failures: list[SiteFailure]
    wasted: list[SiteResult] = field(default_factory=list)  # verified answers to a secure sum that cannot be read
    where: dict[str, str] = field(default_factory=dict)  # the transport's name of a sender -> its verified site

    @property
    def secure(self) -> bool:
        return self.plan.HasField("secure")


def measure(number: int, marginals: list[planner.PlannedMarginal], opts: MeasureOptions, request: Request,
            dictionary: Dictionary, coordinator_key, site_keys, transport: Transport, events: Progress,
            secure: bool = False, cover: set[str] | None = None) -> Round:
    """Sign one plan, send it to every site, keep the summaries whose signatures and receipts verify.

    A secure plan goes out twice: to enroll (the sites check it, debit nothing and return signed
    one-time keys), then with the roster of enrolled keys, to be answered. Its masked sum can be
    read only if every enrolled site answers; otherwise the round counts as unanswered, and the
    sites that did answer are listed as charged for nothing. With `cover` (round 1's sites), a
    secure sum must cover exactly those sites, since it cannot be cut down to fit round 1's tables:
    others are left out of the roster, and if one of them did not enroll the plan is not sent to
    be answered (nothing is debited).
    """
    plan = planner.to_proto(marginals, dictionary, request.coordinator, f"{request.purpose} (round {number})",
                            opts.plan_lifetime_s)
    if secure:
        plan.secure.colluding, plan.secure.min_parties = opts.colluding, opts.min_parties
    signed = planner.sign_plan(plan, coordinator_key)
    rho = sum(m.rho for m in marginals)
    events(f"round {number}: plan {plan.plan_id} with {len(marginals)} marginals, rho {rho:.4g} per site, "
           f"signed by {signed.signer}" + (" (secure aggregation)" if secure else ""), stage="plan")
    failures: list[SiteFailure] = []
    where: dict[str, str] = {}
    to = None
    if secure:
        roster, to, failures, where = _enroll(signed, opts, site_keys, transport, events, cover)
        need = max([opts.min_parties] + [k.min_parties for k in roster])
        absent = sorted((cover or set()) - {k.site for k in roster})
        if absent or len(roster) < need:
            why = (f"the secure sum must cover every round-1 site, and {', '.join(absent)} cannot be in it" if absent
                   else f"{len(roster)} site(s) in the secure sum, {need} needed")
            failures += [SiteFailure(k.site, "NOT_SENT", f"enrolled, but the plan was not sent to be answered: {why} "
                                     "(not charged)") for k in roster]
            events(f"round {number}: {why}; nothing was sent to answer (nothing was debited): "
                   + "; ".join(f"{f.site}: {f.code}" for f in failures))
            return Round(number, marginals, plan, signed, [], failures, where=where)
        signed.roster.extend(roster)
        events(f"round {number}: {len(roster)} site(s) enrolled for the secure sum: {', '.join(s.site for s in roster)}")
    replies, more = transport.query(signed, opts.reply_timeout, events, to=to)
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
        where.setdefault(r.where, result.site)
    results.sort(key=lambda x: x.site)
    missing = sorted({s.site for s in signed.roster} - {r.site for r in results})
    if secure and results and missing:
        events(f"round {number}: the masked sum cannot be read: {', '.join(missing)} did not answer")
        failures += [SiteFailure(r.site, "SUM_INCOMPLETE", f"answered and was charged rho {r.receipt.rho_debited:.4g} for "
                                 f"nothing: the masked sum needs every enrolled site, and {', '.join(missing)} did not answer")
                     for r in results]
        return Round(number, marginals, plan, signed, [], failures, wasted=results, where=where)
    if not results:
        events(f"round {number}: no usable answers: " + "; ".join(f"{f.site}: {f.code}" for f in failures))
        return Round(number, marginals, plan, signed, results, failures, where=where)
    events(f"round {number}: {len(results)} site(s) answered with verified signatures: "
           f"{', '.join(x.site for x in results)}" + (f"; {len(failures)} did not" if failures else ""), stage="aggregate")
    return Round(number, marginals, plan, signed, results, failures, where=where)


def _enroll(signed: pb.SignedPlan, opts: MeasureOptions, site_keys, transport: Transport, events: Progress,
            cover: set[str] | None) -> tuple[list[pb.KeyShare], set[str], list[SiteFailure], dict[str, str]]:
    """Secure plans: collect the sites' signed one-time keys and pick the roster: sites known to the
    coordinator (and in `cover`, if given) that all accept each other (`secagg.agreeing`).
    Returns the roster, where to send the answer round (the transport's names of its members), the
    failures, and the transport's name of each site whose signed share arrived."""
    replies, failures = transport.query(signed, opts.reply_timeout, events, kind="enroll")
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
    return [shares[s] for s in roster], {where[s] for s in roster}, failures, {w: s for s, w in where.items()}


def collect(opts: MeasureOptions, request: Request, dictionary: Dictionary, coordinator_key, site_keys,
            transport: Transport, events: Progress, prior: Sequence[tuple[str, ...]] = ()
            ) -> tuple[list[Round], list[tuple[str, ...]]]:
    """Run the job's measurement strategy; return the rounds and the model's structure (variable sets).

    Every plan's model is sized before it is sent, so a plan the coordinator could not fit never
    costs a site anything. Round 1 must be answered by someone; if round 2 is answered by no one
    (sites down, or over their budget after round 1), round 1 is already paid for, so the release
    goes ahead on round 1's tables within the structure, and the manifest lists the refusals.
    """
    opts.validate()
    rho = request.rho
    events(f"budget: rho {rho:.4g} per site (epsilon {accounting.epsilon(rho, request.delta):.3g} at delta "
           f"{request.delta:g}), strategy {opts.strategy}", stage="plan")
    args = (opts, request, dictionary, coordinator_key, site_keys, transport, events)
    sites = list(site_keys)
    # Secure aggregation: round 2 is a masked sum; round 1 (or a single round) is too, unless it must
    # stay per site because site effects are modelled from it (then round 2 re-measures the 1-way tables).
    secure_first = opts.secure_aggregation and opts.site_variable == "pooled"
    if opts.strategy == "dictionary":
        extra = [tuple(x) for x in opts.structure] + [tuple(x) for x in prior]
        plan = planner.one_round_plan(dictionary, rho, extra)
        structure = [m.variables for m in plan]
        check_model_size(opts, dictionary, structure, sites)
        joint = [s for s in structure if len(s) > 1]
        if not opts.compress or not joint:
            return [_answered(measure(1, plan, *args, secure=secure_first))], structure
        oneway = [(n,) for n in dictionary.names]
        share = opts.round1_share()
        first = _answered(measure(1, planner.allocate(dictionary, oneway, rho * share), *args, secure=secure_first))
        summed = aggregate(first.plan, first.results, dictionary)
        rho_joint = rho * (1 - share)
        if opts.secure_aggregation and not secure_first:  # pooled 1-way tables as secure sums, beside the per-site ones
            joint = oneway + joint
    else:
        if len(dictionary.names) < 2:
            raise PpsehrError("the adaptive strategy selects pairs: the dictionary needs at least 2 variables. Nothing was sent.")
        first = _answered(measure(1, planner.candidate_plan(dictionary, rho * opts.select_fraction), *args, secure=secure_first))
        summed = aggregate(first.plan, first.results, dictionary)
        joint = planner.selected_pairs(dictionary, summed, lambda sets: model_clique(opts, dictionary, sets, sites)[1])
        structure = [(n,) for n in dictionary.names] + joint
        check_model_size(opts, dictionary, structure, sites)
        events(f"selected {len(joint)} pairs from the round-1 candidates ({len(dictionary.names) - 1} in the spanning tree): "
               + ", ".join("-".join(p) for p in joint),
               stage="plan")
        joint = [(n,) for n in dictionary.names] + joint  # round 2 re-measures the 1-way tables too
        rho_joint = rho * (1 - opts.select_fraction)
    if opts.compress:
        n = len(first.results)
        noise_copies = n / max(1, n - opts.colluding) if opts.secure_aggregation else n
        second = planner.compressed_plan(dictionary, joint, summed, rho_joint, noise_copies)
        events("domains compressed by the round-1 1-way counts: " + ", ".join(
            f"{'-'.join(m.variables)} {m.cells(dictionary)} cells" for m in second if len(m.variables) > 1), stage="plan")
    else:
        second = planner.allocate(dictionary, joint, rho_joint)
    rounds = [first, measure(2, second, *args, secure=opts.secure_aggregation, cover={r.site for r in first.results})]
    if not rounds[1].results:
        events("round 2 was answered by no site: the release uses round 1's tables only "
               + ("(1-way tables: no joint structure)" if opts.strategy == "dictionary" else "within the selected tree")
               + "; " + "; ".join(f"{f.site}: {f.code}" for f in rounds[1].failures))
    return rounds, structure


def _answered(rnd: Round) -> Round:
    if not rnd.results:
        raise PpsehrError(f"no site answered the round-{rnd.number} plan: "
                          + "; ".join(f"{f.site}: {f.code} {f.message}" for f in rnd.failures))
    return rnd


MAX_MODEL_CELLS = 2_000_000  # largest clique table a release will fit (the estimator's hard limit is higher)


def model_clique(opts: MeasureOptions, dictionary: Dictionary, structure: list[tuple[str, ...]],
                 sites: Iterable[str]) -> tuple[tuple[str, ...], int]:
    """The largest clique (with the `site` axis, if modelled) of the model a structure needs, and its cells."""
    domain = dictionary.domain()
    if opts.site_variable != "pooled":
        domain = {SITE: max(1, len({opts.site_groups.get(s, s) for s in sites}))} | domain
    sets = [((SITE,) if SITE in domain else ()) + tuple(v) for v in structure]
    tree = JunctionTree(domain, sets)
    biggest = max(tree.cliques, key=lambda c: math.prod(tree.shape(c)))
    return biggest, math.prod(tree.shape(biggest))


def check_model_size(opts: MeasureOptions, dictionary: Dictionary, structure: list[tuple[str, ...]],
                     sites: Iterable[str]) -> None:
    """Refuse, before anything is sent, a structure whose junction tree has a clique table too large to fit."""
    biggest, cells = model_clique(opts, dictionary, structure, sites)
    if cells > MAX_MODEL_CELLS:
        raise PpsehrError(f"the planned marginals need a model clique over {list(biggest)} with {cells:,} cells "
                          f"(limit {MAX_MODEL_CELLS:,}); declare fewer or smaller dependencies. Nothing was sent.")


def round_measurements(dictionary: Dictionary, rounds: list[Round], structure: list[tuple[str, ...]],
                       site_variable: str, site_groups: dict[str, str]) -> tuple[list[Measurement], list[str]]:
    """Aggregate every answered round into the measurements the model is fitted to, and the site
    group labels (empty when sites are pooled).

    Tables outside the structure (adaptive round-1 candidates) informed the selection only, as in
    MST. Secure rounds arrive as pooled sums, also when site effects are modelled (the model's
    site axis then comes from round 1's per-site tables).
    """
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
    return measurements, sorted(set(groups.values()))
