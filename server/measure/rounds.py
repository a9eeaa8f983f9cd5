"""Measurement: signed plans to every site, in rounds, and the verified summaries that come back.

`collect` runs the release's measurement (three Flower rounds, `planner`: per-site 1-way tables,
compressed candidate pairs, then the marginals selected from them; with up to
`planner.PER_SITE_SITES` sites, small per-site 1-way tables first) and returns the rounds and the
model's structure. Rounds after the 1-way tables are secure sums when every site allows it
(`secure_aggregation` automatic, the default), plain sums otherwise; the 1-way tables are tried as
a secure sum too with more than `planner.PER_SITE_SITES` sites, or when those small tables show
that the sites differ too little for per-site ones to be worth their noise. Every plan is checked
against the model it implies before it is sent, so a plan the coordinator could not fit never
costs a site anything.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

from ...common import accounting, secagg
from ...common.dictionary import Dictionary
from ...common.errors import PpsehrError
from ...common.refusals import MAX_PLAN_BYTES
from ...protos import guard_pb2 as pb
from ..model.graphical import SITE, JunctionTree, Measurement
from . import planner
from .aggregate import SiteResult, SummaryRejected, aggregate, planned_shape, verify_reveal, verify_summary
from .identify import Verified, identify
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
    """The measurement stage's settings. The defaults are the release: nothing needs setting.

    Expert overrides: `site_variable` (what happens to sites: site effects modelled where the data
    show them and records pooled / a site column in the records / sites summed away), `site_groups`
    (model coarser site groups), `secure_aggregation` (None: automatic, secure sums when every
    site allows them; True: require them; False: plain sums), `colluding` and `min_parties` (the
    trust terms of secure sums), `structure` (dependencies the coordinator believes in: priors for
    the selection, like the dictionary's declared dependencies, never a fixed structure),
    `dropouts` (enrolled sites a secure sum may lose and still be read; None: `auto_dropouts`),
    `outcome` (the variable the records are for, e.g. a model's target: the workload weighs its
    pairs more, `planner.OUTCOME_WEIGHT`, and round 3 measures every one of them; None: the
    dictionary's `[model] outcome`, if it declares one).
    """

    site_variable: str = "model"  # SITE_MODES
    site_groups: dict[str, str] = field(default_factory=dict)  # site -> group label (default: each site its own)
    secure_aggregation: bool | None = None  # None: secure sums when every site allows them, else plain
    colluding: int = 0  # secure: sites that may collude with the coordinator (their noise is not counted)
    min_parties: int = 3  # secure: a masked sum needs at least this many sites
    dropouts: int | None = None  # secure: enrolled sites that may drop before answering (None: auto_dropouts)
    structure: list[list[str]] = field(default_factory=list)  # further prior dependencies (2-3 variables each)
    outcome: str | None = None  # a declared outcome: its pairs weigh more in the workload
    reply_timeout: float = 300.0
    plan_lifetime_s: float = 1800.0

    def validate(self) -> None:
        """Check every option before anything is sent (a bad job must cost no site any budget)."""
        if self.site_variable not in SITE_MODES:
            raise PpsehrError(f"site_variable must be one of {SITE_MODES}, got {self.site_variable!r}")
        if self.secure_aggregation is not None and not isinstance(self.secure_aggregation, bool):
            raise PpsehrError(f"secure_aggregation must be true or false (or null: automatic), got {self.secure_aggregation!r}")
        for name, low in (("colluding", 0), ("min_parties", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PpsehrError(f"{name} must be an integer of at least {low}, got {value!r}")
        if self.dropouts is not None and (isinstance(self.dropouts, bool) or not isinstance(self.dropouts, int)
                                          or self.dropouts < 0):
            raise PpsehrError(f"dropouts must be a non-negative integer (or null: automatic), got {self.dropouts!r}")
        if self.colluding >= self.min_parties:
            raise PpsehrError(f"colluding ({self.colluding}) must be below min_parties ({self.min_parties}): "
                              "someone's noise must count")
        if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in self.site_groups.items()):
            raise PpsehrError(f"site_groups must map site names to non-empty group names, got {self.site_groups!r}")
        if self.outcome is not None and (not isinstance(self.outcome, str) or not self.outcome):
            raise PpsehrError(f"outcome must be a variable name (or null: none), got {self.outcome!r}")
        if not all(isinstance(s, (list, tuple)) and 2 <= len(s) <= 3 and all(isinstance(v, str) for v in s)
                   for s in self.structure):
            raise PpsehrError(f"structure must list dependencies of 2 or 3 variable names, got {self.structure!r}")

    def tolerated(self, parties: int) -> int:
        """The dropouts a secure plan for `parties` expected sites declares: the option (a roster that
        cannot carry it is not sent to be answered; after sites were lost, at most what the smaller
        roster can carry), or `auto_dropouts`."""
        return self.dropouts if self.dropouts is not None else auto_dropouts(parties, self.min_parties, self.colluding)


def auto_dropouts(parties: int, min_parties: int, colluding: int) -> int:
    """The default dropout tolerance of a secure sum of `parties` sites: one in ten (floor(n / 10)),
    but never so many that the survivors could be fewer than `min_parties` or the Shamir threshold
    n - d below `secagg.min_threshold` (n - d >= d + colluding + 2); none above
    `secagg.MAX_SHARING_ROSTER` sites. Tolerance is paid for whether or not anyone drops (n / (n - d)
    times the noise variance, two more messages), so small consortia, where a dropout between Enroll
    and Answer is rare, get none: 0 below 10 sites, 1 for 10 to 19, 10 for 100."""
    return min(parties // 10, max_dropouts(parties, min_parties, colluding))


def max_dropouts(parties: int, min_parties: int, colluding: int) -> int:
    """The most dropouts a secure sum of `parties` sites can carry: the survivors make `min_parties`,
    t = n - d >= d + colluding + 2, and at most `secagg.MAX_SHARING_ROSTER` sites share seeds."""
    if parties > secagg.MAX_SHARING_ROSTER:
        return 0
    return max(0, min(parties - min_parties, (parties - colluding - 2) // 2))


@dataclass(frozen=True)
class Recovery:
    """A secure sum with dropouts: the coordinator's signed statement of who answered, the survivors'
    signed confirmations of it (site, signature), and their signed reveal receipts (site, receipt
    bytes, signature) that made it readable (empty if the reveals did not suffice)."""

    statement: bytes
    signature: bytes
    confirmations: tuple[tuple[str, bytes], ...] = ()
    reveals: tuple[tuple[str, bytes, bytes], ...] = ()


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
    unenrolled: bool = False  # a secure plan that was never sent to be answered (no roster): nothing was debited
    recovery: Recovery | None = None  # secure plans with dropouts: who answered, and the reveals
    correction: np.ndarray | None = None  # secure plans with dropouts: masks to subtract from the survivors' sum
    fitted: bool = True  # False: left out of the fit (the small per-site tables, when other sites answered the
    # 1-way tables: the model's pooled sums must cover the same sites)

    @property
    def secure(self) -> bool:
        return self.plan.HasField("secure")


def measure(number: int, marginals: list[planner.PlannedMarginal], opts: MeasureOptions, request: Request,
            dictionary: Dictionary, coordinator_key, sites: Verified, transport: Transport, events: Progress,
            secure: bool = False, cover: set[str] | None = None, to_follow: float = 0.0) -> Round:
    """Sign one plan, send it to every verified site, keep the summaries whose signatures and receipts verify.

    The plan is addressed to the sites whose identities were verified (`identify`), and sent only to
    them; those that gave no identity are listed as NOT_VERIFIED (sent nothing, not charged).

    `to_follow` is the rho the release's later rounds will ask of each site: a site that could pay
    for this plan but not for the rest of the release refuses it for free (OVER_BUDGET) instead of
    paying for tables the release could not complete.

    A secure plan goes out twice: to enroll (the sites check it, debit nothing and return signed
    one-time keys), then with the roster of enrolled keys, to be answered. It declares d dropouts
    (`MeasureOptions.tolerated`). With d = 0 its masked sum can be read only if every enrolled
    site answers. With d > 0 it goes out twice more, to the sites that answered, with the
    coordinator's signed statement of who answered: they confirm it, then, given t confirmations,
    reveal what removes the self-masks and the masks shared with up to d sites that did not answer
    (`_recover`). Otherwise the round counts as unanswered,
    and the sites that did answer are listed as charged for nothing. With `cover` (round 1's sites,
    or the previous secure round's survivors), a secure sum must be enrolled by exactly those sites:
    others are left out of the roster, and if one of them did not enroll, or the roster is too small
    for the declared dropouts, the plan is not sent to be answered (nothing is debited).
    """
    plan = planner.to_proto(marginals, dictionary, request.coordinator, f"{request.purpose} (round {number})",
                            opts.plan_lifetime_s, addressees=sites.addressees())
    site_keys = sites.keys
    plan.rho_to_follow = to_follow
    dropouts = 0
    if secure:
        parties = len(cover) if cover is not None else len(site_keys)
        dropouts = opts.tolerated(parties)
        if cover is not None and len(cover) < len(site_keys):  # sites already lost: --dropouts is a ceiling here
            dropouts = min(dropouts, max_dropouts(parties, opts.min_parties, opts.colluding))
        plan.secure.colluding, plan.secure.min_parties, plan.secure.dropouts = opts.colluding, opts.min_parties, dropouts
    signed = planner.sign_plan(plan, coordinator_key)
    rho = sum(m.rho for m in marginals)
    events(f"round {number}: plan {plan.plan_id} with {len(marginals)} marginals, rho {rho:.4g} per site, "
           f"signed by {signed.signer}" + (f" (secure aggregation, tolerating {dropouts} dropout(s))" if secure else ""),
           stage="plan")
    failures: list[SiteFailure] = sites.not_verified()
    where: dict[str, str] = sites.where
    to = sites.to
    if secure:
        roster, to, more, enrolled = _enroll(signed, opts, sites, transport, events, cover)
        failures += more
        where |= enrolled
        need = max([opts.min_parties] + [k.min_parties for k in roster])
        absent = sorted((cover or set()) - {k.site for k in roster})
        short = len(roster) - dropouts < need or (dropouts and len(roster) - dropouts
                                                  < secagg.min_threshold(dropouts, opts.colluding))
        large = dropouts and (len(roster) > secagg.MAX_SHARING_ROSTER or secagg.reveal_request_bytes(
            [k.site for k in roster], len(signed.SerializeToString())) > MAX_PLAN_BYTES)
        if absent or short or large:
            why = (f"the secure sum must cover every site of the earlier rounds, and {', '.join(absent)} cannot be in it"
                   if absent else f"{len(roster)} site(s) in the secure sum, {need} needed" if not dropouts else
                   f"{len(roster)} site(s) in the secure sum; a sum with dropouts shares self-mask seeds among at most "
                   f"{secagg.MAX_SHARING_ROSTER}, within the guards' message limit (use --dropouts 0)" if large else
                   f"{len(roster)} site(s) in the secure sum; tolerating {dropouts} dropout(s) leaves {len(roster) - dropouts}, "
                   f"and {max(need, secagg.min_threshold(dropouts, opts.colluding))} are needed")
            failures += [SiteFailure(k.site, "NOT_SENT", f"enrolled, but the plan was not sent to be answered: {why} "
                                     "(not charged)") for k in roster]
            events(f"round {number}: {why}; nothing was sent to answer (nothing was debited): "
                   + "; ".join(f"{f.site}: {f.code}" for f in failures))
            return Round(number, marginals, plan, signed, [], failures, where=where, unenrolled=True)
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
    recovery, correction = None, None
    if secure and results and (missing or dropouts):
        why = f"{', '.join(missing)} did not answer"
        if len(missing) <= dropouts:
            recovery, correction, why = _recover(number, signed, results, missing, where, dropouts, opts, coordinator_key,
                                                 site_keys, dictionary, transport, events)
        elif dropouts:
            why += f": more than the {dropouts} dropout(s) the plan tolerates"
        if correction is None:
            events(f"round {number}: the masked sum cannot be read: {why}")
            failures += [SiteFailure(r.site, "SUM_INCOMPLETE", f"answered and was charged rho {r.receipt.rho_debited:.4g} "
                                     f"for nothing: the masked sum cannot be read ({why})") for r in results]
            return Round(number, marginals, plan, signed, [], failures, wasted=results, where=where, recovery=recovery)
    if not results:
        events(f"round {number}: no usable answers: " + "; ".join(f"{f.site}: {f.code}" for f in failures))
        return Round(number, marginals, plan, signed, results, failures, where=where)
    events(f"round {number}: {len(results)} site(s) answered with verified signatures: "
           f"{', '.join(x.site for x in results)}" + (f"; {len(failures)} did not" if failures else ""), stage="aggregate")
    return Round(number, marginals, plan, signed, results, failures, where=where, recovery=recovery, correction=correction)


def _recover(number: int, signed: pb.SignedPlan, results: list[SiteResult], dropped: list[str], where: dict[str, str],
             dropouts: int, opts: MeasureOptions, coordinator_key, site_keys, dictionary: Dictionary, transport: Transport,
             events: Progress) -> tuple[Recovery, np.ndarray | None, str]:
    """Secure plans with dropouts: sign who answered, ask the survivors to confirm it and then to reveal,
    and rebuild the masks to remove. Returns the recovery record, the correction (None if the sum
    cannot be read) and why not."""
    plan_sha = hashlib.sha256(signed.plan).digest()
    roster = {k.site: bytes(k.public_key) for k in signed.roster}
    survivors = sorted(r.site for r in results)
    statement = secagg.statement_bytes(plan_sha, roster, survivors, dropped)
    request = pb.SignedPlan(plan=signed.plan, signature=signed.signature, signer=signed.signer)  # guards hold the roster
    request.recovery.statement, request.recovery.signature = statement, coordinator_key.sign(statement)
    for r in results:
        request.recovery.shares.extend(pb.ForwardedShare(sender=r.site, recipient=sh.recipient, ciphertext=sh.ciphertext)
                                       for sh in r.summary.shares if sh.recipient in survivors)
    names = {site: name for name, site in where.items()}
    to = {names.get(s, s) for s in survivors}
    signature = bytes(request.recovery.signature)
    events(f"round {number}: " + (f"{', '.join(dropped)} did not answer; " if dropped else "")
           + f"asking the {len(survivors)} site(s) that answered to confirm who did", stage="measure")
    confirm = pb.SignedPlan()
    confirm.CopyFrom(request)
    del confirm.recovery.shares[:]
    replies, failures = transport.query(confirm, opts.reply_timeout, events, kind="confirm", to=to)
    confirmations = []
    for r in replies:
        try:
            secagg.check_confirmations([r.signed], statement, plan_sha, survivors, site_keys)
        except secagg.RosterError as e:
            events(f"{r.where}: confirmation rejected: {e}")
            continue
        if r.signed.site not in {c.site for c in confirmations}:
            confirmations.append(r.signed)
    confirmations.sort(key=lambda c: c.site)
    confirmed = tuple((c.site, bytes(c.signature)) for c in confirmations)
    t = secagg.threshold(len(roster), dropouts)
    if len(confirmations) < t:
        return (Recovery(statement, signature, confirmed), None,
                f"{len(confirmations)} site(s) confirmed who answered, {t} needed")
    request.recovery.confirmations.extend(confirmations)
    events(f"round {number}: {len(confirmations)} site(s) confirmed; asking them to reveal what removes the masks",
           stage="measure")
    replies, failures = transport.query(request, opts.reply_timeout, events, kind="reveal",
                                        to={names.get(c.site, c.site) for c in confirmations})
    reveals: dict[str, pb.Reveal] = {}
    receipts: list[tuple[str, bytes, bytes]] = []
    for r in replies:
        try:
            site, reveal = verify_reveal(r.signed, site_keys, plan_sha, statement, survivors, dropped)
        except secagg.RosterError as e:
            events(f"{r.where}: reveal rejected: {e}")
            continue
        if site not in reveals:
            reveals[site] = reveal
            receipts.append((site, bytes(reveal.receipt), bytes(reveal.receipt_signature)))
    for f in failures:
        events(f"{f.site}: did not reveal ({f.code}: {f.message})")
    length = sum(math.prod(planned_shape(m, dictionary)[1]) for m in pb.QueryPlan.FromString(signed.plan).marginals)
    try:
        correction = secagg.correction(plan_sha, roster, dropouts, survivors, dropped, reveals, length)
    except secagg.RecoveryError as e:
        return Recovery(statement, signature, confirmed), None, f"the masks could not be removed: {e}"
    events(f"round {number}: masks removed with the reveals of {len(reveals)} site(s)"
           + (f"; the sum is over the {len(survivors)} that answered" if dropped else ""), stage="aggregate")
    return Recovery(statement, signature, confirmed, tuple(sorted(receipts))), correction, ""


def _enroll(signed: pb.SignedPlan, opts: MeasureOptions, sites: Verified, transport: Transport, events: Progress,
            cover: set[str] | None) -> tuple[list[pb.KeyShare], set[str], list[SiteFailure], dict[str, str]]:
    """Secure plans: collect the sites' signed one-time keys and pick the roster: sites known to the
    coordinator (and in `cover`, if given) that all accept each other (`secagg.agreeing`).
    Returns the roster, where to send the answer round (the transport's names of its members), the
    failures, and the transport's name of each site whose signed share arrived."""
    site_keys = sites.keys
    replies, failures = transport.query(signed, opts.reply_timeout, events, kind="enroll", to=sites.to)
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
            failures.append(SiteFailure(site, "NOT_IN_ROSTER", "left out of the secure sum: it did not answer the earlier "
                                        "rounds it builds on (not charged)"))
            continue
        shares[site], where[site] = r.signed, r.where
    roster = secagg.agreeing(shares)
    failures += [SiteFailure(s, "NOT_IN_ROSTER", "left out of the secure sum: its peers or min_parties do not fit the "
                             "other enrolled sites' (not charged)") for s in sorted(set(shares) - set(roster))]
    return [shares[s] for s in roster], {where[s] for s in roster}, failures, {w: s for s, w in where.items()}


@dataclass
class _Secure:
    """Whether the next poolable round is a secure sum: required, never, or automatic (tried while
    every site keeps enrolling; an enrollment that falls short costs nothing and the round goes out
    as plain sums instead, as do the rounds after it)."""

    mode: bool | None
    on: bool = True
    stop: bool = False  # a required secure round could not be formed: later ones would fail alike
    sticky: bool = True  # a round that could not be secure makes the later ones plain (False: this round only)

    def wanted(self, parties: int, min_parties: int) -> bool:
        if self.mode is False or not self.on:
            return False
        return self.mode is True or parties >= min_parties


def _round(number: int, build: Callable[[bool], list[planner.PlannedMarginal]], state: _Secure, args, cover: set[str],
           events: Progress, to_follow: float = 0.0) -> Round:
    """Measure one round that may be a secure sum (`build(secure)` makes its marginals)."""
    opts = args[0]
    if state.wanted(len(cover), opts.min_parties):
        rnd = measure(number, build(True), *args, secure=True, cover=cover, to_follow=to_follow)
        if rnd.results or state.mode is True:
            if not rnd.results:
                state.stop = rnd.unenrolled
            return rnd
        state.on = False
        if not rnd.unenrolled:  # enrolled, answered, but the sum could not be read: that budget is spent
            events(f"round {number}: the secure sum could not be read; "
                   + ("later rounds are plain sums" if state.sticky else "the later rounds still try secure sums"))
            return rnd
        events(f"round {number}: secure aggregation is not possible with these sites (enrolling cost them nothing): "
               + ("this round and the next are plain sums" if state.sticky else "this round goes out per site"),
               stage="plan")
    return measure(number, build(False), *args, to_follow=to_follow)


def collect(opts: MeasureOptions, request: Request, dictionary: Dictionary, coordinator_key, site_keys,
            transport: Transport, events: Progress, prior: Sequence[tuple[str, ...]] = ()
            ) -> tuple[list[Round], list[tuple[str, ...]]]:
    """Measure in three or four rounds; return the rounds and the model's structure (variable sets, `site`
    included where site effects are modelled).

    First, for free, the sites' identities are checked against `site_keys` (`identify`): a site name or
    key that does not match stops the release here (SiteMismatch), before any plan that costs budget;
    the rounds go only to the verified sites (at least one), addressed to them.

    Round 1: the 1-way tables (planner.ONEWAY_SHARE of rho), per site; one secure sum with sites
    pooled, and tried as one (declaring a dropout where the roster can carry it) with more than
    planner.PER_SITE_SITES sites when secure sums are possible (`planner.per_site_round_one`).
    With up to planner.PER_SITE_SITES sites and secure sums possible, small per-site 1-way tables
    come first (planner.DIFFERENCE_SHARE of rho, from the 1-way share): if the sites differ by less than
    planner.SITE_WORTH times the noise per-site tables would add (`planner.site_worth`), the 1-way
    tables are tried as one secure sum of the sites that answered (no site effects). A site that does not
    enroll sends them per site after all, and the later rounds still try secure sums.
    Then the candidate pairs, compressed (planner.CANDIDATE_SHARE), and the 1-way tables again
    with the selected pairs (the rest). The plans spend exactly rho per site. The 1-way round
    must be answered by someone;
    if a later round is answered by no one, what was paid for is used (the manifest lists the
    refusals): without candidates, round 3 measures the prior dependencies and the outcome's pairs.
    If the 1-way tables show that a candidate table would hold fewer records per cell than
    planner.MIN_CANDIDATE_SNR noise sigmas (a small consortium at a small budget), there is
    no candidate round: the selected marginals (prior dependencies, outcome's pairs) are round 2
    and get its budget too.
    """
    opts.validate()
    rho = request.rho
    names = dictionary.names
    priors = [tuple(d) for d in dictionary.dependencies] + [tuple(x) for x in opts.structure] + [tuple(x) for x in prior]
    unknown = sorted({v for s in priors for v in s} - set(names))
    if unknown:
        raise PpsehrError(f"the prior dependencies name variables the dictionary does not have: {unknown}. Nothing was sent.")
    outcome = opts.outcome or dictionary.outcome
    if outcome is not None and outcome not in planner.joint_names(dictionary):
        why = "is tier 3 (1-way tables only)" if outcome in names else "is not a variable of the dictionary"
        raise PpsehrError(f"the outcome {outcome!r} {why}. Nothing was sent.")
    check_model_size(opts, dictionary, [(n,) for n in names], list(site_keys))
    verified = identify(site_keys, dictionary.hash, transport, opts.reply_timeout, events)
    sites = sorted(verified.keys)
    mode = {None: "automatic", True: "required", False: "off"}[opts.secure_aggregation]
    events(f"budget: rho {rho:.4g} per site (epsilon {accounting.epsilon(rho, request.delta):.3g} at delta "
           f"{request.delta:g}); rounds: (up to {planner.PER_SITE_SITES} sites) how the sites differ, 1-way tables, "
           "candidate pairs, selected marginals; "
           f"secure aggregation {mode}", stage="plan")
    args = (opts, request, dictionary, coordinator_key, verified, transport, events)
    state = _Secure(opts.secure_aggregation)
    joint = len(planner.joint_names(dictionary)) > 1  # else there is nothing to select: one round of 1-way tables
    shares = (planner.ONEWAY_SHARE, planner.CANDIDATE_SHARE) if joint else (1.0, 0.0)
    r1 = planner.oneway_plan(dictionary, rho * shares[0])
    before: list[Round] = []  # rounds before the 1-way tables that were answered: how the sites differ, or an
    # unreadable secure sum of the 1-way tables

    def secure_one_way(number: int, cover: set[str], why: str) -> Round:
        """The 1-way tables tried as one secure sum of `cover` (no site effects); if a site cannot enroll, per site
        after all; if the sum was paid for and cannot be read, per site again from the later rounds' share."""
        nonlocal shares
        events(why, stage="plan")
        rnd = _round(number, lambda secure: r1, _Secure(None, sticky=False), (_round_one_options(opts, len(cover)),
                     *args[1:]), cover, events, rho * (1 - shares[0]))
        if rnd.wasted and not rnd.results and joint:
            before.append(rnd)
            shares = (shares[0] + sum(m.rho for m in r1) / rho, shares[1])
            events(f"round {number + 1}: the 1-way tables per site, paid from the later rounds' share (rho "
                   f"{rho * (1 - shares[0]):.4g} per site is left for them)", stage="plan")
            rnd = measure(number + 1, r1, *args, to_follow=rho * (1 - shares[0]))
        return _answered(rnd)

    secure_first = state.wanted(len(sites), opts.min_parties)
    if opts.site_variable == "pooled":  # nothing is modelled per site: round 1 may be a secure sum too
        first = _answered(_round(1, lambda secure: r1, state, args, set(sites), events, rho * (1 - shares[0])))
    elif opts.site_variable != "model" or opts.site_groups or not secure_first:  # site groups asked for: per site
        first = _answered(measure(1, r1, *args, to_follow=rho * (1 - shares[0])))
    elif not planner.per_site_round_one(len(sites)):
        first = secure_one_way(1, set(sites), f"round 1 tried as one secure sum: with {len(sites)} sites (over "
                               f"{planner.PER_SITE_SITES}) per-site tables would put every site's noise in the pooled "
                               "1-way tables; no site effects are modelled")
    elif not joint:  # nothing to select, no site effects: the 1-way tables per site, as ever
        first = _answered(measure(1, r1, *args, to_follow=rho * (1 - shares[0])))
    else:  # up to PER_SITE_SITES sites: small per-site tables say whether the sites differ enough for per-site ones
        tested = _answered(measure(1, planner.oneway_plan(dictionary, rho * planner.DIFFERENCE_SHARE), *args,
                                   to_follow=rho * (1 - planner.DIFFERENCE_SHARE)))
        before.append(tested)
        answered = {r.site for r in tested.results}
        r1 = planner.oneway_plan(dictionary, rho * (shares[0] - planner.DIFFERENCE_SHARE))
        worth = planner.site_worth(dictionary, aggregate(tested.plan, tested.results, dictionary, {s: s for s in answered}),
                                   r1, _copies(_round_one_options(opts, len(answered)), len(answered)))
        if planner.per_site_round_one(len(answered), state.wanted(len(answered), opts.min_parties), worth):
            events(f"round 2: the 1-way tables per site (the sites differ by {worth:.2g} times the noise per-site "
                   "tables add" + (")" if worth >= planner.SITE_WORTH else
                                   f"; {len(answered)} site(s) are too few for a secure sum)"), stage="plan")
            first = _answered(measure(2, r1, *args, to_follow=rho * (1 - shares[0])))
        else:
            first = secure_one_way(2, answered, f"round 2 tried as one secure sum: the sites differ by {worth:.2g} times "
                                   f"the noise per-site tables would add to the pooled 1-way tables (under "
                                   f"{planner.SITE_WORTH:g}), too little to model site effects; none are modelled")
        # fitted too, unless a site answered only one of the two: pooled sums must cover the same sites
        tested.fitted = {r.site for r in tested.results} == {r.site for r in first.results}
    rounds = before + [first]
    if not joint:
        return rounds, [(n,) for n in names] + ([(SITE,)] if opts.site_variable == "release" else [])
    cover = {r.site for r in first.results}
    if state.mode is None and len(cover) < opts.min_parties:
        events(f"secure aggregation needs at least {opts.min_parties} sites (min_parties) and {len(cover)} answered "
               "the 1-way tables: plain sums", stage="plan")
    oneway = aggregate(first.plan, first.results, dictionary, correction=first.correction)
    n = len(first.results)

    def copies(secure: bool) -> float:  # the sum's noise variance in units of one site's planned variance
        return _copies(opts, n) if secure else float(n)

    second = None
    plans: dict[bool, list[planner.PlannedMarginal]] = {}

    def candidates_for(secure: bool) -> list[planner.PlannedMarginal]:  # planned once per kind of sum
        if secure not in plans:
            plans[secure] = planner.candidate_plan(dictionary, oneway, rho * shares[1], copies(secure), priors, outcome)
        return plans[secure]

    if not state.stop:
        wanted = state.wanted(len(cover), opts.min_parties)
        snr = planner.candidate_snr(dictionary, candidates_for(wanted), oneway, copies(wanted))
        if snr < planner.MIN_CANDIDATE_SNR:
            events(f"no candidate round: at this budget a candidate table would hold {snr:.2g} records per cell per "
                   f"noise sigma (under {planner.MIN_CANDIDATE_SNR:g}), too few to tell which pairs matter; its budget "
                   "goes to the selected marginals", stage="plan")
            shares = (shares[0], 0.0)
        else:
            second = _round(len(rounds) + 1, candidates_for, state, args, cover, events, rho * (1 - shares[0] - shares[1]))
            rounds.append(second)
    groups = _groups(opts, [r.site for r in first.results])
    site_tables = []
    if opts.site_variable != "pooled" and not first.secure and len(set(groups.values())) > 1:  # per site after all
        site_tables = aggregate(first.plan, first.results, dictionary, groups)

    def clique_cells(sets: list[tuple[str, ...]]) -> int:
        return model_clique(opts, dictionary, sets, sites)[1]

    if second is not None and second.results:
        candidates = aggregate(second.plan, second.results, dictionary, correction=second.correction)
        rest = rho * (1 - shares[0] - shares[1])
        sigma3 = planner.pair_sigma(dictionary, candidates, rest, copies(state.on and state.mode is not False
                                                                           and second.secure))
        selection = planner.select(dictionary, oneway, candidates, site_tables, priors, clique_cells, sigma3,
                                   outcome=outcome)
        events(f"selected {len(selection.pairs)} pairs from {len(candidates)} candidates: a spanning tree of "
               f"{len(selection.tree)} ({', '.join('-'.join(p) for p in selection.tree)})"
               + (f", {len(selection.outcome)} more with the outcome ({', '.join('-'.join(p) for p in selection.outcome)})"
                  if selection.outcome else "")
               + (f" and {len(selection.extras)} the tree model missed ({', '.join('-'.join(p) for p in selection.extras)})"
                  if selection.extras else "")
               + (f"; site effects on {', '.join(selection.site)}" if selection.site else "; no site effects modelled"),
               stage="plan")
    else:
        known = [tuple(p) for p in planner.structure(dictionary, [tuple(x) for x in opts.structure] + list(prior))
                 if dictionary.dependencies or opts.structure or prior]
        selection = planner.prior_selection(dictionary, known, outcome, clique_cells, oneway)
        events(f"no candidates were measured: round {len(rounds) + 1} measures the prior dependencies and the "
               "variables missing about as often as each other"
               + (f" ({', '.join('-'.join(p) for p in selection.tree)})" if selection.tree else " (none)")
               + (f" and the outcome's pairs ({', '.join('-'.join(p) for p in selection.outcome)})" if selection.outcome
                  else ""), stage="plan")
    structure = selection.structure(dictionary) + ([(SITE,)] if opts.site_variable == "release" else [])
    check_model_size(opts, dictionary, structure, sites)
    if state.stop:
        return rounds, structure
    rest = rho * (1 - shares[0] - shares[1])
    if second is not None and second.secure and second.results:  # a site that dropped out of round 2 is not waited for
        cover = {r.site for r in second.results}
    last = len(rounds) + 1
    third = _round(last, lambda secure: planner.final_plan(dictionary, selection.pairs, oneway, rest, copies(secure), outcome),
                   state, args, cover, events)
    rounds.append(third)
    if third.results:
        events("domains compressed by the 1-way counts: " + ", ".join(
            f"{'-'.join(m.variables)} {m.cells(dictionary)} cells" for m in third.marginals if len(m.variables) > 1),
            stage="plan")
    else:
        events(f"round {last} was answered by no site: the release uses the earlier rounds' tables within the selected "
               "structure; " + "; ".join(f"{f.site}: {f.code}" for f in third.failures))
    return rounds, structure


def _groups(opts: MeasureOptions, sites: Iterable[str]) -> dict[str, str]:
    return {s: opts.site_groups.get(s, s) for s in sites}


def _copies(opts: MeasureOptions, parties: int) -> float:
    """The noise variance of a secure sum of `parties` sites in units of one site's planned variance:
    each site's share is sized for the sites left after the declared dropouts and colluders."""
    return parties / max(1, parties - opts.tolerated(parties) - opts.colluding)


def _round_one_options(opts: MeasureOptions, parties: int) -> MeasureOptions:
    """A secure 1-way round declares at least one dropout where the roster can carry it (unless
    `dropouts` is set): per-site tables would lose only a site that does not answer, and a sum
    that cannot be read must be paid for again per site. One dropout costs parties / (parties - 1)
    times the noise variance, per-site tables `parties` times."""
    if opts.dropouts is not None:
        return opts
    return replace(opts, dropouts=max(opts.tolerated(parties),
                                      min(1, max_dropouts(parties, opts.min_parties, opts.colluding))))


def _answered(rnd: Round) -> Round:
    if not rnd.results:
        what = (f"the round-{rnd.number} secure sum could not be read" if rnd.wasted
                else f"no site answered the round-{rnd.number} plan")
        raise PpsehrError(what + ": " + "; ".join(f"{f.site}: {f.code} {f.message}" for f in rnd.failures))
    return rnd


def model_clique(opts: MeasureOptions, dictionary: Dictionary, structure: list[tuple[str, ...]],
                 sites: Iterable[str]) -> tuple[tuple[str, ...], int]:
    """The largest clique of the model a structure needs (with its `site` axis, if `site` is in a
    set), and its cells."""
    domain = dictionary.domain()
    if any(SITE in s for s in structure):
        domain = {SITE: max(1, len(set(_groups(opts, sites).values())))} | domain
    tree = JunctionTree(domain, [tuple(v) for v in structure])
    biggest = max(tree.cliques, key=lambda c: math.prod(tree.shape(c)))
    return biggest, math.prod(tree.shape(biggest))


def check_model_size(opts: MeasureOptions, dictionary: Dictionary, structure: list[tuple[str, ...]],
                     sites: Iterable[str]) -> None:
    """Refuse, before a plan is sent, a structure whose junction tree has a clique table too large to fit."""
    biggest, cells = model_clique(opts, dictionary, structure, sites)
    if cells > MAX_MODEL_CELLS:
        raise PpsehrError(f"the planned marginals need a model clique over {list(biggest)} with {cells:,} cells "
                          f"(limit {MAX_MODEL_CELLS:,}). Nothing more was sent.")


def round_measurements(dictionary: Dictionary, rounds: list[Round], structure: list[tuple[str, ...]],
                       site_variable: str, site_groups: dict[str, str]) -> tuple[list[Measurement], list[str]]:
    """Aggregate every answered round into the measurements the model is fitted to, and the site
    group labels (empty when `site` is not a model variable).

    Every table whose variables lie inside one of the model's cliques is used, candidates included
    (they are noisier than round 3's tables, and the estimator weighs each by its noise); a table
    outside every clique (a candidate that was not selected) is used through its 1-way margins
    (`margins`). Per-site
    tables keep their `site` axis where the model has site effects on their variables and are
    summed over sites elsewhere; secure rounds arrive as pooled sums. A secure sum cannot be cut
    down, so when sites dropped out of one (`Round.correction`), the model covers the sites of the
    last secure sum that was read: per-site tables are kept for those sites only, and an earlier
    secure sum over other sites is left out (it still served the selection).
    """
    answered = [rnd for rnd in rounds if rnd.results and rnd.fitted]
    secure_sets = [{r.site for r in rnd.results} for rnd in answered if rnd.secure]
    keep = secure_sets[-1] if secure_sets else {r.site for rnd in answered for r in rnd.results}
    used = [(rnd, [r for r in rnd.results if r.site in keep]) for rnd in answered
            if not rnd.secure or {r.site for r in rnd.results} == keep]
    used = [(rnd, results) for rnd, results in used if results]
    sites = sorted({r.site for _, results in used for r in results})
    with_site = site_variable != "pooled" and any(SITE in s for s in structure)
    if with_site and SITE in dictionary.variables:
        raise PpsehrError(f"the dictionary has a variable named {SITE!r}; use site_variable = 'pooled'")
    sets = [tuple(v) for v in structure if SITE not in v or with_site]
    if not with_site:
        # pooled sums must cover the same sites in every round, or totals would disagree
        common = set.intersection(*({r.site for r in results} for _, results in used))
        if not common:  # no site answered every round: pool round 1 alone
            used, common = used[:1], {r.site for r in used[0][1]}
        measurements = [m for rnd, results in used if not rnd.secure or {r.site for r in results} == common
                        for m in aggregate(rnd.plan, [r for r in results if r.site in common], dictionary,
                                           correction=rnd.correction)]
        groups: dict[str, str] = {}
        domain = dictionary.domain()
    else:
        groups = {s: site_groups.get(s, s) for s in sites}
        measurements = [m for rnd, results in used for m in aggregate(rnd.plan, results, dictionary,
                                                                       None if rnd.secure else groups, rnd.correction)]
        domain = {SITE: len(set(groups.values()))} | dictionary.domain()
    cliques = [set(c) for c in JunctionTree(domain, sets).cliques]
    inside = lambda vs: any(set(vs) <= c for c in cliques)  # noqa: E731
    kept = []
    for m in measurements:
        kept += [p for p in ([m] if inside(m.variables) else margins(m, inside)) if np.any(p.weights() > 0)]
    return kept, sorted(set(groups.values()))


def margins(m: Measurement, inside: Callable[[Sequence[str]], bool]) -> list[Measurement]:
    """A table the model has no clique for, as its 1-way margins (with `site` where the model has
    that site effect): a candidate that was not selected still informs every variable's margin.

    The margins share the table's noise, so each one's variance is multiplied by their number (as
    if each used its share of the table): they never count for more than the table did. They are
    `derived`: fitted, never published as DP aggregates."""
    keep = [tuple(a for a in (SITE, v) if a in m.variables and (a == v or inside((SITE, v))))
            for v in m.variables if v != SITE]
    out = []
    for axes in keep:
        drop = tuple(k for k, v in enumerate(m.variables) if v not in axes)
        variance = np.broadcast_to(np.asarray(m.variance, dtype=float), m.values.shape).sum(axis=drop) * len(keep)
        groups = tuple(m.groups[m.variables.index(v)] for v in axes) if m.coarse else None
        out.append(Measurement(axes, m.values.sum(axis=drop), variance, groups, derived=True))
    return out
