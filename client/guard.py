"""The site guard: the only process that reads a hospital's data, and its gRPC service.

At start the guard loads the site's data through its mapping, one record per patient (or up to
k per patient, charged k^2 by group privacy), and refuses to start on a source whose patients'
contributions are not bounded (common/source.py, common/privacy_unit.py); every receipt states that
unit. For each query plan: check that it is signed by an allowlisted coordinator and addressed to
this site by name and signing-key fingerprint (NOT_ADDRESSED otherwise), then check it against the
dictionary and the site policy (refusals cost nothing), build one OpenDP measurement per marginal (discrete Gaussian noise on its count vector
over public cells, costed by OpenDP at the count's sensitivity), debit their exact privacy loss in
the durable ledger, and only then count the whole plan in one pass over the rows
(common/cells.py) and answer. Plans with secure aggregation take two calls: Enroll checks the plan the same
way (debiting nothing) and returns a signed one-time key; Answer then carries every enrolled
site's key, and the guard adds its share of the noise and masks its tables so that only the sum
over all enrolled sites can be read (common/secagg.py). A secure plan that tolerates dropouts takes
two more calls after the coordinator signs who answered: Confirm (the guard signs that statement,
one per plan) and Reveal (once, for the statement it confirmed, given threshold confirmations):
shares of the survivors' self-mask seeds and its pair-mask seeds with the sites that dropped, never
both for one site, and never for a site whose answer it is shown. Identify (free) returns the site's name and
key signed over a coordinator's challenge, so a coordinator can check its --site-key list before
it sends anything that costs budget (common/addressing.py). An evaluation plan comes with a release's
records and asks for noisy counts comparing them with the site's rows (client/evaluate.py), debited
the same way. Everything that leaves is a noisy table
over public cells or a number the site's policy already makes public; refusals carry fixed
codes and messages built from the plan and the policy, never from data. Any other failure leaves as the fixed INTERNAL code; its
details stay in the site's log. Threat model and the attacks tested: docs/security.md.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import grpc
import numpy as np
from ..common import opendp_core as dp

from ..common import accounting, addressing, cells, keys, secagg
from ..common.dictionary import Dictionary, load_dictionary
from ..common.mapping import EncodedTable, load_mapping
from ..common.source import load_site_table
from ..common.procs import usable_cores
from ..common.refusals import MAX_PLAN_BYTES, REFUSAL_CODES
from ..protos import guard_pb2 as pb
from ..protos import guard_pb2_grpc as pb_grpc
from . import evaluate
from .config import SiteConfig
from .ledger import BudgetExceeded, Debit, DuplicatePlan, Ledger, LedgerError, RateLimited

log = logging.getLogger("ppsehr.guard")
MAX_ID = 128
# Smallest rho per marginal: below it the noise (sigma > 22,000) swamps any count, and at the
# extreme (denormal rho) the noise scale overflows.
MIN_RHO = 1e-9
# In-flight requests the gRPC server holds at once (each up to MAX_PLAN_BYTES); more get RESOURCE_EXHAUSTED.
MAX_CONCURRENT_RPCS = 32
INTERNAL_MESSAGE = "the guard failed; the site admin has the details"
MAX_SESSIONS = 256  # enrolled, not yet answered secure plans held in memory

# Refusal code -> gRPC status. The code travels in the status details as "CODE: message".
GRPC_STATUS = {
    "MALFORMED_PLAN": grpc.StatusCode.INVALID_ARGUMENT,
    "DICTIONARY_MISMATCH": grpc.StatusCode.FAILED_PRECONDITION,
    "UNKNOWN_VARIABLE": grpc.StatusCode.INVALID_ARGUMENT,
    "VARIABLE_NOT_ALLOWED": grpc.StatusCode.PERMISSION_DENIED,
    "BAD_RHO": grpc.StatusCode.INVALID_ARGUMENT,
    "POLICY_LIMIT": grpc.StatusCode.PERMISSION_DENIED,
    "RATE_LIMITED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "OVER_BUDGET": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DUPLICATE_PLAN": grpc.StatusCode.ALREADY_EXISTS,
    "UNTRUSTED_SIGNER": grpc.StatusCode.PERMISSION_DENIED,
    "BAD_SIGNATURE": grpc.StatusCode.UNAUTHENTICATED,
    "NOT_ADDRESSED": grpc.StatusCode.FAILED_PRECONDITION,
    "PLAN_EXPIRED": grpc.StatusCode.FAILED_PRECONDITION,
    "REPLAYED_PLAN": grpc.StatusCode.ALREADY_EXISTS,
    "SECURE_AGGREGATION": grpc.StatusCode.FAILED_PRECONDITION,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}


class Refusal(Exception):
    """A plan the guard will not answer. The message must never carry data values."""

    def __init__(self, code: str, message: str):
        assert code in GRPC_STATUS and code in REFUSAL_CODES
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class CompiledMarginal:
    variables: tuple[str, ...]
    shape: tuple[int, ...]  # grouped shape when the query coarsens its variables
    groups: tuple  # per variable: cell -> group array, or None
    scale: float  # secure plans: this site's share of the noise
    rho: float  # privacy loss at d_in = 1 (OpenDP's map; secure: of the sum), at most the requested rho
    measurement: object  # OpenDP: exact count vector -> noisy counts (`noisy_counts`)
    rho_alone: float  # OpenDP's map of this site's own noise (what a secure answer costs if the others collude)
    bound: str = ""  # secure plans: which bound `rho` is (accounting.BOUNDS)


def _short(name: str) -> str:
    return repr(name if len(name) <= 64 else name[:61] + "...")


# Noise scales are pure functions of (rho[, parties, cells]); every site of a consortium gets the same
# plan, so a process answering many (a simulation worker) computes each once.
_scale_for_rho = functools.lru_cache(maxsize=65536)(accounting.scale_for_rho)
_share_scale_for_rho = functools.lru_cache(maxsize=65536)(accounting.share_scale_for_rho)


# Exact discrete Gaussian noise costs 50-100 us a cell; plans with this many cells are noised on
# several threads (each marginal's measurement is still invoked exactly once).
PARALLEL_NOISE_CELLS = 2000


@functools.lru_cache(maxsize=1)
def _noise_pool() -> futures.ThreadPoolExecutor:
    return futures.ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="noise")


@functools.lru_cache(maxsize=64)
def count_sensitivity(records: int = 1) -> int:
    """L2 sensitivity of a marginal's count vector when `records` rows are added or removed (one
    patient's): OpenDP's stability map of `count_by_categories` (symmetric distance -> L2) at d_in = records."""
    space = dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.symmetric_distance()
    count = space >> dp.t.then_count_by_categories(categories=[0], null_category=False, MO=dp.L2Distance[int])
    return count.map(records)


@functools.lru_cache(maxsize=65536)
def noisy_counts(n_cells: int, scale: float):
    """The OpenDP measurement a marginal's exact count vector (int64, `n_cells` long) goes through:
    discrete Gaussian noise of `scale` on every cell. Its privacy map at `count_sensitivity()` is
    the loss of `count_by_categories >> gaussian` on the rows (tests/test_guard_speed.py)."""
    return dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T=dp.i64), size=n_cells), dp.l2_distance(T=dp.i64), scale=scale)


def compile_plan(plan: pb.QueryPlan, dictionary: Dictionary, config: SiteConfig,
                 honest: int | None = None) -> list[CompiledMarginal]:
    """Check a plan against dictionary and policy and build its OpenDP measurements. Raises Refusal.

    A secure plan's noise is shared by `honest` sites (its roster minus the colluding ones): each
    adds the smallest share whose distributed loss is within the planned rho, and each table is
    charged the smaller of that bound and OpenDP's map of the site's own share (both valid;
    `accounting.secure_table_rho`). Without `honest` (at enrollment) a secure plan is checked, and
    costed at its planned rho.

    A planned rho is the loss of one privacy unit, a patient. When a patient contributes up to
    k = config.rows_per_patient records, each table's noise is calibrated for rho / k^2 per record
    and the patient's loss is charged by group privacy: OpenDP's privacy map at d_in = k (k^2 times
    the per-record loss; secure sums: the smaller of k^2 times the distributed bound and the map at k)."""
    policy = config.policy
    if plan.HasField("secure"):
        check_secure(plan.secure, config)
    if not plan.plan_id or len(plan.plan_id) > MAX_ID or len(plan.coordinator) > MAX_ID or len(plan.purpose) > 2000:
        raise Refusal("MALFORMED_PLAN", f"plan_id must be 1-{MAX_ID} characters, coordinator name at most {MAX_ID}, purpose at most 2000")
    if plan.dictionary_hash != dictionary.hash:
        raise Refusal("DICTIONARY_MISMATCH", f"plan is for dictionary {plan.dictionary_hash[:80]!r}; "
                      f"this site uses {dictionary.name} {dictionary.version} ({dictionary.hash})")
    if not plan.marginals and not plan.HasField("evaluation"):
        raise Refusal("MALFORMED_PLAN", "plan has no marginals")
    if len(plan.marginals) > policy.max_marginals:
        raise Refusal("POLICY_LIMIT", f"plan has {len(plan.marginals)} marginals; policy allows at most {policy.max_marginals}")
    allowed = None if "*" in policy.allowed_variables else set(policy.allowed_variables)
    total_rho, total_cells, specs = 0.0, 0, []
    for i, m in enumerate(plan.marginals):
        names = tuple(m.variables)
        if len(names) > policy.max_width:
            raise Refusal("POLICY_LIMIT", f"marginal {i}: {len(names)} variables; policy allows at most {policy.max_width}")
        if not names or len(set(names)) != len(names):
            raise Refusal("MALFORMED_PLAN", f"marginal {i}: needs 1 or more distinct variables")
        for n in names:
            if n not in dictionary.variables:
                raise Refusal("UNKNOWN_VARIABLE", f"marginal {i}: variable {_short(n)} is not in dictionary {dictionary.name} {dictionary.version}")
            if allowed is not None and n not in allowed:
                raise Refusal("VARIABLE_NOT_ALLOWED", f"marginal {i}: variable {_short(n)} is not allowed by this site's policy")
            if dictionary[n].tier == 3 and (policy.tier3 == "deny" or (policy.tier3 == "one-way" and len(names) > 1)):
                raise Refusal("VARIABLE_NOT_ALLOWED", f"marginal {i}: tier-3 variable {_short(n)} is "
                              + ("not released by this site" if policy.tier3 == "deny" else "only released in 1-way marginals"))
        if not (isinstance(m.rho, float) and math.isfinite(m.rho) and m.rho >= MIN_RHO):
            raise Refusal("BAD_RHO", f"marginal {i}: rho must be a finite number of at least {MIN_RHO:g}, got {m.rho!r}")
        if len(m.groups) > len(names) or any(len(g.cell_group) > dictionary[n].size for g, n in zip(m.groups, names)):
            raise Refusal("MALFORMED_PLAN", f"marginal {i}: groupings do not fit its variables' domains")
        try:
            maps, shape = cells.check_groups([dictionary[n].size for n in names], [list(g.cell_group) for g in m.groups])
        except ValueError as e:
            raise Refusal("MALFORMED_PLAN", f"marginal {i}: {e}") from None
        n_cells = math.prod(shape)
        if n_cells > policy.max_cells:
            raise Refusal("POLICY_LIMIT", f"marginal {i}: {n_cells} cells; policy allows at most {policy.max_cells} per marginal")
        total_cells += n_cells
        total_rho += m.rho
        specs.append((names, shape, maps, m.rho))
    if total_cells > policy.max_total_cells:
        raise Refusal("POLICY_LIMIT", f"plan has {total_cells} cells in all; policy allows at most {policy.max_total_cells}")
    if total_rho > policy.max_rho_per_plan * (1 + 1e-12):
        raise Refusal("POLICY_LIMIT", f"plan asks for rho {total_rho:.6g}; policy allows at most {policy.max_rho_per_plan:.6g} per plan")
    compiled = []
    k = config.rows_per_patient
    scales: dict[tuple[float, int], float] = {}  # a plan's marginals mostly share a few (rho, cells)
    for names, shape, maps, rho in specs:
        n_cells = math.prod(shape)
        row_rho = rho / (k * k)  # group privacy: a patient's k records cost k^2 times one record
        key = (row_rho, n_cells if honest else 0)
        if key not in scales:
            scales[key] = _share_scale_for_rho(row_rho, honest, n_cells) if honest else _scale_for_rho(row_rho)
        scale = scales[key]
        meas = noisy_counts(n_cells, scale)
        alone = float(meas.map(count_sensitivity(k)))  # the loss of one patient: k records added or removed
        # secure: the smaller of the distributed bound (k^2 x, group privacy) and OpenDP's map of this site's own share
        actual, bound = accounting.secure_table_rho(scale, honest, n_cells, alone, k) if honest else (alone, "")
        if actual > rho * (1 + 1e-9):
            raise Refusal("INTERNAL", "noise calibration failed")
        compiled.append(CompiledMarginal(names, shape, maps, scale, actual, meas, alone, bound))
    return compiled


def check_secure(secure: pb.SecureAggregation, config: SiteConfig) -> None:
    """Refuse a secure plan this site's [secure_aggregation] policy does not allow."""
    sa = config.secure_aggregation
    if sa is None:
        raise Refusal("SECURE_AGGREGATION", "this site's policy has no [secure_aggregation] section; it answers only "
                      "plans without secure aggregation")
    if secure.colluding < sa.assume_colluding:
        raise Refusal("SECURE_AGGREGATION", f"the plan counts on all but {secure.colluding} site(s) adding noise; "
                      f"this site assumes up to {sa.assume_colluding} may collude")
    need = max(sa.min_parties, secure.colluding + 1)
    if secure.min_parties < need:
        raise Refusal("SECURE_AGGREGATION", f"the plan's min_parties is {secure.min_parties}; this site needs at least {need}")


@dataclass
class _Checking:
    plan: pb.QueryPlan  # the plan being checked, as far as it is known (for the audit entry of a refusal)


class SiteGuard:
    """A site's data, dictionary, policy and ledger, and the logic that answers plans."""

    def __init__(self, config: SiteConfig):
        self.dictionary = load_dictionary(config.dictionary)
        mapping = load_mapping(config.mapping, self.dictionary)
        if mapping.site != config.site:
            log.warning("mapping %s names site %r; the guard's configuration says %r", config.mapping, mapping.site, config.site)
        self._table: EncodedTable  # refuses a source whose patients' contributions are not bounded
        self._table, self.validation = load_site_table(mapping, self.dictionary)
        # The unit every answer is charged for and every receipt states (common/privacy_unit.py).
        self.config = config = dataclasses.replace(config, privacy_unit=self._table.unit,
                                                   rows_per_patient=self._table.rows_per_patient)
        self.ledger = Ledger(config.ledger_path, config.rho_limit, config.site)
        problem = self.ledger.check()
        if problem:
            raise LedgerError(f"{config.ledger_path}: {problem}; the guard will not answer plans until the site "
                              "admin has investigated (`ppsehr site audit`)")
        self._signing_key = keys.load_signing_key(config.signing_key)
        self.fingerprint = keys.fingerprint(self._signing_key.public_key())
        self._coordinators = {keys.fingerprint(k): k for k in map(keys.load_public_key, config.coordinator_keys)}
        sa = config.secure_aggregation
        self._peers = ({site: keys.load_public_key(path) for site, path in sa.peers.items()}
                       | {config.site: self._signing_key.public_key()}) if sa else {}
        self._sessions: dict[bytes, secagg.Session] = {}
        self._answered: dict[bytes, secagg.Answered] = {}  # secure plans with dropouts: answered, not yet revealed
        self._lock = threading.Lock()
        self.policy_sha256 = self.ledger.record_policy({
            "rho_limit": config.rho_limit, "delta": config.delta, "policy": config.policy.__dict__,
            "coordinators": sorted(self._coordinators), "max_plan_lifetime_s": config.max_plan_lifetime_s,
            "dictionary": self.dictionary.hash, "unit": config.privacy_unit, "rows_per_patient": config.rows_per_patient}
            | ({"secure_aggregation": {"peers": sorted(f"{s}={keys.fingerprint(k)}" for s, k in self._peers.items()),
                                       "min_parties": sa.min_parties, "assume_colluding": sa.assume_colluding}} if sa else {}))

    def describe(self) -> pb.SiteDescription:
        p = self.config.policy
        return pb.SiteDescription(
            site=self.config.site, dictionary_hash=self.dictionary.hash, rho_limit=self.config.rho_limit,
            rho_spent=self.ledger.spent(),
            limits=pb.PolicyLimits(max_rho_per_plan=p.max_rho_per_plan, max_marginals=p.max_marginals,
                                   max_width=p.max_width, max_cells=p.max_cells, max_plans_per_day=p.max_plans_per_day))

    def identify(self, request: pb.IdentityRequest) -> pb.SiteIdentity:
        """This site's name and signing key, signed over the coordinator's challenge. Free: nothing is
        debited, claimed or written to the ledger. Raises Refusal (a challenge of the wrong size)."""
        try:
            return addressing.sign_identity(self.config.site, self._signing_key, request.challenge, self.dictionary.hash)
        except ValueError as e:
            raise Refusal("MALFORMED_PLAN", str(e)) from None

    def check_addressed(self, plan: pb.QueryPlan) -> None:
        """Refuse a plan that does not name this site, by its name and its key's fingerprint, among its addressees."""
        if addressing.addressed(plan, self.config.site, self.fingerprint):
            return
        me = f"this site is {self.config.site!r} with key {self.fingerprint}"
        if not plan.addressees:
            raise Refusal("NOT_ADDRESSED", f"{me}; the plan names no addressees, and a guard answers only plans "
                          "addressed to it (nothing was debited)")
        raise Refusal("NOT_ADDRESSED", f"{me}; the plan is addressed to {addressing.describe(plan.addressees)}: "
                      "the coordinator holds another name or key for this site (nothing was debited)")

    def open_plan(self, signed: pb.SignedPlan, claim: bool = True, checking: _Checking | None = None) -> pb.QueryPlan:
        """Check the coordinator's signature, the addressees, expiry and freshness of a plan (and claim
        its single-use id unless `claim` is False). Raises Refusal."""
        key = self._coordinators.get(signed.signer)
        if key is None:
            raise Refusal("UNTRUSTED_SIGNER", f"plan signer {signed.signer[:80]!r} is not an allowlisted coordinator of this site")
        if not keys.verify(key, signed.signature, signed.plan):
            raise Refusal("BAD_SIGNATURE", "the plan's signature does not verify")
        try:
            plan = pb.QueryPlan.FromString(signed.plan)
        except Exception:
            raise Refusal("MALFORMED_PLAN", "the signed bytes are not a query plan") from None
        try:  # before the plan id is claimed: a plan for others leaves no trace but its audit entry
            self.check_addressed(plan)
        except Refusal:
            if checking is not None:
                checking.plan = plan  # the audit entry names the (validly signed) plan
            raise
        now = time.time()
        if plan.expires_at < now:
            raise Refusal("PLAN_EXPIRED", "the plan has expired")
        if plan.expires_at > now + self.config.max_plan_lifetime_s:
            raise Refusal("PLAN_EXPIRED", f"the plan expires more than {self.config.max_plan_lifetime_s:g} s from now")
        if not plan.plan_id or len(plan.plan_id) > MAX_ID:
            raise Refusal("MALFORMED_PLAN", f"plan_id must be 1-{MAX_ID} characters")
        if not (math.isfinite(plan.rho_to_follow) and plan.rho_to_follow >= 0):
            raise Refusal("MALFORMED_PLAN", "rho_to_follow must be a finite number >= 0")
        if not (self.ledger.claim_plan(plan.plan_id) if claim else not self.ledger.seen_plan(plan.plan_id)):
            raise Refusal("REPLAYED_PLAN", f"plan {plan.plan_id!r} was seen before; plan ids are single-use")
        return plan

    def _afford_the_rest(self, plan: pb.QueryPlan, rho: float, held: float = 0.0) -> None:
        """Refuse (free) a plan this site could pay for but not also the later rounds of its release."""
        if plan.rho_to_follow <= 0:
            return
        left = self.config.rho_limit - self.ledger.spent() - held
        if rho + plan.rho_to_follow > left * (1 + 1e-12):
            raise Refusal("OVER_BUDGET", f"this plan (rho {rho:.6g}) and the later rounds of its release (rho "
                          f"{plan.rho_to_follow:.6g}) need rho {rho + plan.rho_to_follow:.6g}, but only {max(left, 0.0):.6g} "
                          "of the lifetime budget is left")

    @contextmanager
    def _refusals(self, signed: pb.SignedPlan) -> Iterator[_Checking]:
        """Turn whatever stops a plan before its debit into a Refusal, and audit it (it costs nothing)."""
        checking = _Checking(pb.QueryPlan(plan_id="?", coordinator=signed.signer[:MAX_ID]))
        try:
            try:
                yield checking
            except BudgetExceeded as e:
                raise Refusal("OVER_BUDGET", str(e)) from None
            except RateLimited as e:
                raise Refusal("RATE_LIMITED", str(e)) from None
            except DuplicatePlan:
                raise Refusal("DUPLICATE_PLAN", f"plan {checking.plan.plan_id[:MAX_ID]!r} was already answered; plan ids are single-use") from None
            except Refusal:
                raise
            except Exception:  # nothing was debited; the details stay in the site's log
                log.exception("error checking plan %r before any debit", checking.plan.plan_id[:MAX_ID])
                raise Refusal("INTERNAL", INTERNAL_MESSAGE + " (nothing was debited)") from None
        except Refusal as r:
            plan = checking.plan
            self.ledger.audit("refused", plan.plan_id[:MAX_ID], signed.signer[:MAX_ID], r.code,
                              {"reason": r.message, "marginals": len(plan.marginals)})
            log.info("refused plan %r from %r: %s", plan.plan_id[:MAX_ID], signed.signer[:MAX_ID], r)
            raise

    def enroll(self, signed: pb.SignedPlan) -> pb.KeyShare:
        """Secure plans, step 1: check the plan as `answer` would, debit nothing, and return this
        site's signed one-time key for it. Raises Refusal.

        A plan is enrolled once: a second Enroll for it gets the same signed share back while the
        key is held, and is refused once the key is gone (answered, expired, or the guard
        restarted), because that the site enrolled is recorded in the ledger. A new key would make
        the roster the coordinator already holds unusable, and the round unreadable after the other
        sites have paid; whoever can reach the guard port with a captured plan could do that."""
        plan_sha = hashlib.sha256(signed.plan).digest()
        with self._refusals(signed) as checking:
            checking.plan = plan = self.open_plan(signed, claim=False, checking=checking)
            if not plan.HasField("secure") or plan.HasField("evaluation"):
                raise Refusal("SECURE_AGGREGATION", "only plans with secure aggregation are enrolled; send this one to Answer")
            with self._lock:
                held = self._sessions.get(plan_sha)
            if held is not None and held.share is not None:
                return held.share  # the same key, never a new one
            rho = math.fsum(c.rho for c in compile_plan(plan, self.dictionary, self.config))
            per_day = self.config.policy.max_plans_per_day
            private, share = secagg.new_share(self.config.site, plan_sha, self._signing_key,
                                              set(self._peers) - {self.config.site},
                                              max(self.config.secure_aggregation.min_parties, plan.secure.min_parties))
            with self._lock:  # enrolled plans hold their budget and a daily slot until answered or expired
                held = self._sessions.get(plan_sha)
                if held is not None and held.share is not None:
                    return held.share  # a concurrent Enroll of the same plan got there first
                now = time.time()
                self._sessions = {k: v for k, v in self._sessions.items() if v.expires_at >= now}
                if len(self._sessions) >= MAX_SESSIONS:
                    raise Refusal("RATE_LIMITED", f"{MAX_SESSIONS} enrolled plans are waiting for their answers")
                if self.ledger.plans_since(86400) + len(self._sessions) >= per_day:
                    raise RateLimited(per_day)
                held_rho = math.fsum(v.rho for v in self._sessions.values())
                left = self.config.rho_limit - self.ledger.spent() - held_rho
                if rho > left * (1 + 1e-12):
                    raise BudgetExceeded(rho, left)
                self._afford_the_rest(plan, rho, held_rho)
                if not self.ledger.claim_enrollment(plan.plan_id, signed.signer,
                                                    {"rho_planned": rho, "marginals": len(plan.marginals)}):
                    raise Refusal("REPLAYED_PLAN", f"plan {plan.plan_id!r} was enrolled here before and its one-time key "
                                  "is gone (answered, expired or the guard restarted); a plan is enrolled once")
                self._sessions[plan_sha] = secagg.Session(private, share.public_key, float(plan.expires_at), rho, share)
        return share

    def _roster(self, signed: pb.SignedPlan, plan: pb.QueryPlan, plan_sha: bytes) -> tuple[dict[str, bytes], secagg.Session | None]:
        """The verified roster of a secure plan and this site's session for it ({} and None otherwise)."""
        if not plan.HasField("secure"):
            if signed.roster:
                raise Refusal("MALFORMED_PLAN", "the plan has no secure aggregation but comes with a roster")
            return {}, None
        with self._lock:
            session = self._sessions.pop(plan_sha, None)  # one-time: a key masks one answer at most
        if session is None:
            raise Refusal("SECURE_AGGREGATION", "this guard holds no key for the plan: it was not enrolled here, "
                          "its enrollment expired, or the guard restarted since")
        try:
            roster = secagg.check_roster(signed.roster, plan_sha, self._peers)
        except secagg.RosterError as e:
            raise Refusal("SECURE_AGGREGATION", str(e)) from None
        if roster.get(self.config.site) != session.public:
            raise Refusal("SECURE_AGGREGATION", "the roster does not carry this site's key for the plan")
        need = max(plan.secure.min_parties, self.config.secure_aggregation.min_parties)
        d = plan.secure.dropouts
        if len(roster) - d < need:
            raise Refusal("SECURE_AGGREGATION", f"the roster has {len(roster)} site(s)" + (
                f"; tolerating {d} dropout(s) leaves {len(roster) - d}" if d else "") + f"; the sum needs at least {need}")
        if d and len(roster) > secagg.MAX_SHARING_ROSTER:
            raise Refusal("SECURE_AGGREGATION", f"the roster has {len(roster)} sites; a plan with dropouts shares "
                          f"self-mask seeds among at most {secagg.MAX_SHARING_ROSTER}")
        if d and len(roster) - d < secagg.min_threshold(d, plan.secure.colluding):
            raise Refusal("SECURE_AGGREGATION", f"the plan's dropouts ({d}) leave a threshold of {len(roster) - d} "
                          f"shares; with {plan.secure.colluding} colluding site(s) it must be at least "
                          f"{secagg.min_threshold(d, plan.secure.colluding)}, or the coordinator could unmask an answer")
        return roster, session

    def answer(self, signed: pb.SignedPlan) -> pb.SignedSummary:
        """Answer a signed plan, or raise Refusal. Refused plans are audited and cost nothing."""
        plan_sha = hashlib.sha256(signed.plan).digest()
        with self._refusals(signed) as checking:
            checking.plan = plan = self.open_plan(signed, checking=checking)
            evaluation = self._compile_evaluation(signed, plan)
            roster, session = self._roster(signed, plan, plan_sha)
            honest = accounting.honest_shares(len(roster), plan.secure.colluding, plan.secure.dropouts) if roster else None
            compiled = compile_plan(plan, self.dictionary, self.config, honest)
            pad, sealed, held = None, [], None
            if session is not None:  # agree the masks before paying: a peer key that fails is refused for free
                length = sum(math.prod(c.shape) for c in compiled)
                try:
                    pad = secagg.mask(self.config.site, session.private, roster, plan_sha, length)
                    if plan.secure.dropouts:
                        pad, sealed, held = self._self_mask(signed, plan, plan_sha, session, roster, pad, length)
                except secagg.RosterError as e:
                    raise Refusal("SECURE_AGGREGATION", str(e)) from None
            rho = math.fsum([c.rho for c in compiled] + ([evaluation.rho] if evaluation else []))
            if evaluation and rho > self.config.policy.max_rho_per_plan * (1 + 1e-12):
                raise Refusal("POLICY_LIMIT", f"plan asks for rho {rho:.6g}; policy allows at most "
                              f"{self.config.policy.max_rho_per_plan:.6g} per plan")
            self._afford_the_rest(plan, rho)
            secure = {"secure": {"parties": len(roster), "colluding": plan.secure.colluding,
                                 "dropouts": plan.secure.dropouts}} if roster else {}
            evaluated = {"evaluation": {"release_id": plan.evaluation.release_id[:MAX_ID], "queries": len(evaluation.queries()),
                                        "records_sha256": plan.evaluation.records_sha256.hex()}} if evaluation else {}
            debit = self.ledger.debit(plan.plan_id, signed.signer, plan_sha, rho,
                                      {"marginals": len(compiled), "purpose": plan.purpose[:200],
                                       "coordinator_name": plan.coordinator[:MAX_ID], "policy": self.policy_sha256[:16]}
                                      | secure | evaluated, max_plans_per_day=self.config.policy.max_plans_per_day)
        # The debit is durable: from here on, a failure wastes budget but never overspends it.
        try:
            reply = self._measure(signed, plan, plan_sha, compiled, debit, roster, pad, evaluation, sealed)
            if held is not None:
                with self._lock:
                    now = time.time()
                    self._answered = {k: v for k, v in self._answered.items() if v.expires_at >= now}
                    self._answered[plan_sha] = held
            return reply
        except Exception:
            log.exception("answering plan %r failed after its debit", plan.plan_id)
            self.ledger.audit("failed", plan.plan_id, signed.signer, "INTERNAL", {"rho_wasted": debit.rho})
            raise Refusal("INTERNAL", "measurement failed after the debit; the site admin has the details") from None

    def _self_mask(self, signed: pb.SignedPlan, plan: pb.QueryPlan, plan_sha: bytes, session: secagg.Session,
                   roster: dict[str, bytes], pad: np.ndarray, length: int):
        """Dropout tolerance: add a self-mask from a fresh seed, Shamir-share the seed among the roster
        (threshold n - dropouts), seal each peer's share for it; return the pad, the sealed shares and
        what Reveal will need."""
        me = self.config.site
        seed = secagg.new_self_seed()
        shares = secagg.shamir_split(seed, secagg.threshold(len(roster), plan.secure.dropouts),
                                     [secagg.index(roster, s) for s in sorted(roster)])
        sealed = [pb.SealedShare(recipient=s, ciphertext=secagg.seal_share(me, session.private, s, roster[s], plan_sha,
                                                                         shares[secagg.index(roster, s)]))
                  for s in sorted(roster) if s != me]
        held = secagg.Answered(session.private, roster, shares[secagg.index(roster, me)], plan.secure.dropouts,
                               max(plan.secure.min_parties, self.config.secure_aggregation.min_parties), signed.signer,
                               plan.plan_id, float(plan.expires_at), plan.secure.colluding)
        return pad + secagg.self_pad(me, seed, plan_sha, length), sealed, held

    def _recovery(self, signed: pb.SignedPlan, checking: _Checking, pop: bool
                  ) -> tuple[pb.QueryPlan, bytes, secagg.Answered, pb.RecoveryStatement]:
        """Confirm and Reveal: the held answer of this plan and its checked recovery statement. Raises Refusal."""
        plan_sha = hashlib.sha256(signed.plan).digest()
        try:
            checking.plan = plan = pb.QueryPlan.FromString(signed.plan)
        except Exception:
            raise Refusal("MALFORMED_PLAN", "the signed bytes are not a query plan") from None
        gone = Refusal("SECURE_AGGREGATION", "this guard holds no answer of this plan to recover: it did not answer "
                       "it, already revealed for it, its plan expired, or the guard restarted since")
        with self._lock:
            held = self._answered.get(plan_sha)
        if held is None or held.expires_at < time.time():
            raise gone
        key = self._coordinators.get(held.signer)
        if signed.signer != held.signer or key is None or not keys.verify(key, signed.signature, signed.plan):
            raise Refusal("BAD_SIGNATURE", "the plan is not signed by the coordinator whose plan this site answered")
        rec = signed.recovery
        if not keys.verify(key, rec.signature, rec.statement):
            raise Refusal("BAD_SIGNATURE", "the recovery statement is not signed by the plan's coordinator")
        if pop:  # Reveal: one per answer once the coordinator asks, whatever happens below (others cannot burn it)
            with self._lock:
                if self._answered.pop(plan_sha, None) is not held:
                    raise gone
        try:
            statement = pb.RecoveryStatement.FromString(rec.statement)
            secagg.check_statement(statement, plan_sha, held.roster, held.dropouts)
        except secagg.RosterError as e:
            raise Refusal("SECURE_AGGREGATION", str(e)) from None
        except Exception:
            raise Refusal("MALFORMED_PLAN", "the recovery statement cannot be parsed") from None
        if self.config.site not in statement.survivors:
            raise Refusal("SECURE_AGGREGATION", "the recovery statement lists this site as dropped, but it answered: "
                          "it reveals nothing for it")
        if len(statement.survivors) < held.need:
            raise Refusal("SECURE_AGGREGATION", f"the recovery statement leaves {len(statement.survivors)} site(s) in the "
                          f"sum; this site joins sums of at least {held.need}")
        return plan, plan_sha, held, statement

    def confirm(self, signed: pb.SignedPlan) -> pb.Confirmation:
        """Secure plans with dropouts, step 3: sign the coordinator's statement of who answered. A site
        confirms one statement per plan (the same one again is fine) and reveals only for it, so a
        coordinator telling sites different stories cannot gather threshold confirmations for two.
        Costs no budget. Raises Refusal."""
        with self._refusals(signed) as checking:
            plan, plan_sha, held, _ = self._recovery(signed, checking, pop=False)
            digest = hashlib.sha256(signed.recovery.statement).digest()
            with self._lock:
                if held.confirmed not in (None, digest):
                    raise Refusal("SECURE_AGGREGATION", "this site already confirmed another recovery statement for "
                                  "this plan; it confirms one")
                held.confirmed = digest
            self.ledger.audit("confirmed", plan.plan_id, signed.signer, "OK", {"statement_sha256": digest.hex()})
        return pb.Confirmation(site=self.config.site, statement_sha256=digest,
                               signature=self._signing_key.sign(secagg.confirm_bytes(self.config.site, plan_sha, digest)))

    def reveal(self, signed: pb.SignedPlan) -> pb.SignedReveal:
        """Secure plans with dropouts, step 4: given the coordinator's signed statement of who answered,
        which this site confirmed and at least threshold survivors confirmed, reveal this site's shares
        of the survivors' self-mask seeds and its pair-mask seeds with the dropped sites. Once per
        answered plan: the held key is gone after the first request the coordinator signed, refused or
        not (a request without its signature changes nothing). Costs no budget.
        Raises Refusal.

        Never for a site that answered: a site the statement lists as dropped but whose sealed share
        (sent only with an answer) is forwarded here is refused, as is a statement listing this site
        (which answered) as dropped. Because every honest guard reveals for the one statement it
        confirmed, and two statements cannot both gather threshold confirmations, all honest guards
        reveal for the same survivors: an answer the coordinator hid and called dropped gets its pair
        seeds revealed but never its self-mask shares, so it stays masked."""
        with self._refusals(signed) as checking:
            plan, plan_sha, held, statement = self._recovery(signed, checking, pop=True)
            rec = signed.recovery
            me, roster = self.config.site, held.roster
            survivors, dropped = list(statement.survivors), list(statement.dropped)
            if held.confirmed != hashlib.sha256(rec.statement).digest():
                raise Refusal("SECURE_AGGREGATION", "this site did not confirm this recovery statement; it reveals only "
                              "for the one it confirmed")
            try:
                confirmed = secagg.check_confirmations(rec.confirmations, rec.statement, plan_sha, survivors, self._peers)
            except secagg.RosterError as e:
                raise Refusal("SECURE_AGGREGATION", str(e)) from None
            t = secagg.threshold(len(roster), held.dropouts)
            if len(confirmed) < t:
                raise Refusal("SECURE_AGGREGATION", f"{len(confirmed)} survivor(s) confirmed the recovery statement; "
                              f"revealing needs {t}")
            mine: dict[str, int] = {me: held.own_share}
            try:
                for f in rec.shares:
                    if f.recipient != me:
                        continue
                    if f.sender in dropped:
                        raise Refusal("SECURE_AGGREGATION", f"the recovery statement lists {f.sender!r} as dropped, but "
                                      f"its answer's sealed share is here: {f.sender!r} answered, and its masks are "
                                      "never revealed")
                    if f.sender not in survivors or f.sender in mine:
                        raise Refusal("SECURE_AGGREGATION", f"a forwarded share names sender {f.sender[:80]!r}, not a "
                                      "survivor in the roster (or twice)")
                    mine[f.sender] = secagg.open_share(me, held.private, f.sender, roster[f.sender], plan_sha, f.ciphertext)
                seeds = [pb.RevealedSeed(peer=x, seed=secagg.pair_seed(me, held.private, x, roster[x], plan_sha))
                         for x in dropped]
            except secagg.RosterError as e:
                raise Refusal("SECURE_AGGREGATION", str(e)) from None
            owners = sorted(mine)
            receipt = pb.RevealReceipt(site=me, plan_id=plan.plan_id, plan_sha256=plan_sha,
                                       statement_sha256=hashlib.sha256(rec.statement).digest(), shares_of=owners,
                                       seeds_with=dropped, revealed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                                       ).SerializeToString(deterministic=True)
            self.ledger.audit("revealed", plan.plan_id, signed.signer, "OK", {"shares_of": owners, "seeds_with": dropped})
        reveal = pb.Reveal(site=me, plan_sha256=plan_sha, receipt=receipt, receipt_signature=self._signing_key.sign(receipt),
                           shares=[pb.RevealedShare(owner=o, share=mine[o].to_bytes(16, "big")) for o in owners],
                           seeds=seeds).SerializeToString(deterministic=True)
        log.info("revealed for plan %r: self-mask shares of %d survivor(s), pair seeds with %s", plan.plan_id,
                 len(owners), ", ".join(dropped) or "no dropped site")
        return pb.SignedReveal(reveal=reveal, signature=self._signing_key.sign(reveal), signer=self.fingerprint)

    def _compile_evaluation(self, signed: pb.SignedPlan, plan: pb.QueryPlan) -> evaluate.CompiledEvaluation | None:
        """An evaluation plan's own queries, checked and compiled before any debit (None for other plans)."""
        if not plan.HasField("evaluation"):
            if signed.records:
                raise Refusal("MALFORMED_PLAN", "records come only with evaluation plans")
            return None
        try:
            return evaluate.compile_evaluation(plan, signed.records, self.dictionary, self.config.policy, MIN_RHO,
                                               self.config.rows_per_patient)
        except evaluate.EvaluationRefused as e:
            raise Refusal(e.code, e.message) from None

    def _rows(self) -> np.ndarray:
        """This site's rows as (n, V) cells in dictionary order (evaluations compare whole rows)."""
        return np.stack([np.asarray(self._table.columns[n], dtype=np.int64) for n in self.dictionary.names], axis=1)

    def _measure(self, signed: pb.SignedPlan, plan: pb.QueryPlan, plan_sha: bytes, compiled: list[CompiledMarginal],
                 debit: Debit, roster: dict[str, bytes], pad: np.ndarray | None,
                 evaluation: evaluate.CompiledEvaluation | None = None, sealed=()) -> pb.SignedSummary:
        """Run the paid-for measurements (masked with `pad`, for a secure plan) and sign summary and receipt."""
        exact = cells.count_tables(self._table.columns, self._table.n_rows, [(c.variables, c.shape, c.groups) for c in compiled])
        if sum(len(x) for x in exact) >= PARALLEL_NOISE_CELLS:  # OpenDP's sampler releases the GIL: use the cores
            noisy = list(_noise_pool().map(lambda cx: cx[0].measurement(cx[1]), zip(compiled, exact)))
        else:
            noisy = [c.measurement(x) for c, x in zip(compiled, exact)]
        del exact
        answer = evaluate.run_evaluation(evaluation, self._rows(), self.dictionary) if evaluation else None
        if pad is not None:
            offsets = np.cumsum([0] + [len(x) for x in noisy])
            tables = [pb.NoisyMarginal(variables=c.variables, shape=c.shape, masked=secagg.masked(x, pad[a:b]).tolist(),
                                       rho=c.rho, noise_scale=c.scale)
                      for c, x, a, b in zip(compiled, noisy, offsets, offsets[1:])]
            secure = {"roster_sha256": secagg.roster_sha256(roster), "parties": len(roster),
                      "colluding": plan.secure.colluding, "dropouts": plan.secure.dropouts,
                      "rho_alone": math.fsum(c.rho_alone for c in compiled),
                      "bound": accounting.combined_bound([c.bound for c in compiled])}
        else:
            tables = [pb.NoisyMarginal(variables=c.variables, shape=c.shape, counts=x, rho=c.rho, noise_scale=c.scale)
                      for c, x in zip(compiled, noisy)]
            secure = {}
        receipt = pb.BudgetReceipt(site=self.config.site, plan_id=plan.plan_id, plan_sha256=plan_sha, rho_debited=debit.rho,
                                   rho_spent_total=debit.total_after, rho_limit=self.config.rho_limit,
                                   debited_at=debit.at, ledger_seq=debit.seq, dictionary_hash=self.dictionary.hash,
                                   coordinator=signed.signer, delta=self.config.delta, unit=self.config.privacy_unit,
                                   rows_per_patient=self.config.rows_per_patient,
                                   **secure).SerializeToString(deterministic=True)
        summary = pb.Summary(site=self.config.site, plan_id=plan.plan_id, dictionary_hash=self.dictionary.hash,
                             marginals=tables, receipt=receipt, receipt_signature=self._signing_key.sign(receipt),
                             evaluation=answer, shares=sealed).SerializeToString(deterministic=True)
        self.ledger.audit("answered", plan.plan_id, signed.signer, "OK", {"rho": debit.rho, "marginals": len(tables)})
        log.info("answered plan %r from %r: %d marginals, rho %.6g (site total %.6g of %.6g)", plan.plan_id,
                 plan.coordinator[:MAX_ID], len(tables), debit.rho, debit.total_after, self.config.rho_limit)
        return pb.SignedSummary(summary=summary, signature=self._signing_key.sign(summary), signer=self.fingerprint)


class GuardServicer(pb_grpc.SiteGuardServicer):
    """gRPC face of a SiteGuard. Every error leaves as a fixed code and a data-free message."""

    def __init__(self, guard: SiteGuard):
        self.guard = guard

    def Describe(self, request, context):
        try:
            return self.guard.describe()
        except Exception:  # gRPC would otherwise send "Exception calling application: <text>"
            log.exception("describing the site failed")
            context.abort(grpc.StatusCode.INTERNAL, "INTERNAL: " + INTERNAL_MESSAGE)

    def Answer(self, request, context):
        return self._call(self.guard.answer, request, context)

    def Enroll(self, request, context):
        return self._call(self.guard.enroll, request, context)

    def Reveal(self, request, context):
        return self._call(self.guard.reveal, request, context)

    def Confirm(self, request, context):
        return self._call(self.guard.confirm, request, context)

    def Identify(self, request, context):
        return self._call(self.guard.identify, request, context)

    @staticmethod
    def _call(method, request, context):
        try:
            return method(request)
        except Refusal as r:
            context.abort(GRPC_STATUS[r.code], str(r))
        except Exception:  # never let exception text cross the boundary
            log.exception("unexpected error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "INTERNAL: " + INTERNAL_MESSAGE)


def serve(config: SiteConfig, address: str | None = None, ready=None) -> None:
    """Run the guard until SIGINT/SIGTERM. `ready(port)` is called once it listens."""
    import signal

    guard = SiteGuard(config)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS, options=[
        ("grpc.max_receive_message_length", MAX_PLAN_BYTES),
        ("grpc.max_send_message_length", 256 * 1024 * 1024)])
    pb_grpc.add_SiteGuardServicer_to_server(GuardServicer(guard), server)
    address = address or config.listen
    host = address.rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the guard listens on %s without TLS: only the site's SuperNode host should be able to reach it "
                    "(firewall it); see docs/security.md", address)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("site %s guard listening on %s (rho spent %.6g of %.6g)", config.site, address.rsplit(":", 1)[0] + f":{port}",
             guard.ledger.spent(), config.rho_limit)
    if ready:
        ready(port)
    while not stop.wait(0.5):
        pass
    server.stop(grace=2).wait()
