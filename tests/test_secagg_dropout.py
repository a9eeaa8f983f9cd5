"""Dropout-tolerant secure sums (issue #16.2): Shamir-shared self-masks, sealed shares, the guard's
Reveal, noise provisioned for the survivors, and releases that state what was provisioned and what
happened."""

from __future__ import annotations

import hashlib
import math
import shutil

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ppsehr.common import accounting, keys, secagg
from ppsehr.common.errors import ReleaseError
from ppsehr.deploy.transports import InProcessTransport
from ppsehr.protos import guard_pb2 as pb
from ppsehr.server.measure.aggregate import aggregate, verify_reveal, verify_summary
from ppsehr.server.measure.rounds import MeasureOptions, auto_dropouts
from ppsehr.server.measure.transport import SiteFailure
from ppsehr.server.release.bundle import verify_release

from conftest import edit_manifest, resign_manifest, secure_job, site_guards

SITES = ("cleveland", "hungarian", "switzerland", "va")


# ------------------------------------------------------------------ Shamir and sealed shares
def test_any_threshold_of_shares_rebuilds_a_seed_and_fewer_do_not():
    secret = secagg.new_self_seed()
    shares = secagg.shamir_split(secret, 3, [1, 2, 3, 4, 5])
    for xs in ([1, 2, 3], [2, 4, 5], [1, 3, 5], [1, 2, 3, 4, 5]):
        assert secagg.shamir_combine({x: shares[x] for x in xs}) == secret
    assert secagg.shamir_combine({x: shares[x] for x in (1, 2)}) != secret  # t - 1 shares: a random field element
    # the coefficients depend only on the points, so one set serves every seed
    other = secagg.new_self_seed()
    more = secagg.shamir_split(other, 3, [1, 2, 3, 4, 5])
    c = secagg.lagrange_at_zero([2, 3, 5])
    assert secagg.shamir_combine({x: more[x] for x in (2, 3, 5)}, c) == other
    with pytest.raises(ValueError, match="threshold 6 among 5"):
        secagg.shamir_split(secret, 6, [1, 2, 3, 4, 5])


def test_sealed_shares_open_only_for_their_recipient():
    plan_sha = hashlib.sha256(b"plan").digest()
    a, b, c = (X25519PrivateKey.generate() for _ in range(3))
    pub = {n: k.public_key().public_bytes_raw() for n, k in zip("abc", (a, b, c))}
    share = secagg.new_self_seed()
    sealed = secagg.seal_share("a", a, "b", pub["b"], plan_sha, share)
    assert secagg.open_share("b", b, "a", pub["a"], plan_sha, sealed) == share
    assert share.to_bytes(16, "big") not in sealed
    # the coordinator (or any third site, with its own key) cannot open it, nor pass it off as another's
    with pytest.raises(secagg.RosterError, match="does not open"):
        secagg.open_share("c", c, "a", pub["a"], plan_sha, sealed)
    with pytest.raises(secagg.RosterError, match="does not open"):
        secagg.open_share("b", b, "c", pub["c"], plan_sha, sealed)
    with pytest.raises(secagg.RosterError, match="does not open"):
        secagg.open_share("b", b, "a", pub["a"], hashlib.sha256(b"other").digest(), sealed)
    tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
    with pytest.raises(secagg.RosterError, match="does not open"):
        secagg.open_share("b", b, "a", pub["a"], plan_sha, tampered)


def test_default_dropouts():
    assert [auto_dropouts(n, 3, 0) for n in (3, 4, 9, 10, 19, 20, 100, 200, 201)] == [0, 0, 0, 1, 1, 2, 10, 20, 0]
    assert auto_dropouts(10, 3, 7) == 0  # the threshold n - d must stay at least d + colluding + 2
    assert auto_dropouts(10, 10, 0) == 0  # the survivors must still make min_parties
    assert MeasureOptions(dropouts=2).tolerated(4) == 2 and MeasureOptions().tolerated(4) == 0
    with pytest.raises(Exception, match="dropouts must be a non-negative integer"):
        MeasureOptions(dropouts=-1).validate()
    assert accounting.honest_shares(4, 0, 1) == 3
    with pytest.raises(ValueError, match="counts on no site's noise"):
        accounting.honest_shares(3, 1, 2)


# ------------------------------------------------------------------ the guard's protocol
def secure_plan(dictionary, marginals, dropouts=1, colluding=0, min_parties=3):
    plan = pb.QueryPlan(plan_id=f"d-{np.random.randint(1 << 62)}", coordinator="tester", purpose="dropout test",
                        dictionary_hash=dictionary.hash,
                        marginals=[pb.MarginalQuery(variables=v, rho=r) for v, r in marginals])
    plan.secure.colluding, plan.secure.min_parties, plan.secure.dropouts = colluding, min_parties, dropouts
    return plan


def enroll_all(running, signed):
    out = pb.SignedPlan()
    out.CopyFrom(signed)
    out.roster.extend(g.stub.Enroll(signed) for g in running)
    return out


def refused(call, request):
    with pytest.raises(grpc.RpcError) as e:
        call(request)
    return e.value.details()


def reveal_request(signed, results, survivors, dropped, coordinator_key, forward=None, confirm_by=()):
    """What the coordinator sends to Reveal: its signed statement, the survivors' sealed shares, and the
    confirmations of the guards in `confirm_by` (asked first, with Confirm)."""
    plan_sha = hashlib.sha256(signed.plan).digest()
    roster = {k.site: bytes(k.public_key) for k in signed.roster}
    request = pb.SignedPlan()
    request.CopyFrom(signed)
    statement = secagg.statement_bytes(plan_sha, roster, survivors, dropped)
    request.recovery.statement, request.recovery.signature = statement, coordinator_key.sign(statement)
    for r in results:
        if forward is None or r.site in forward:
            request.recovery.shares.extend(pb.ForwardedShare(sender=r.site, recipient=s.recipient, ciphertext=s.ciphertext)
                                           for s in r.summary.shares)
    request.recovery.confirmations.extend([g.stub.Confirm(request) for g in confirm_by])
    return request


@pytest.fixture
def four(guards):
    return guards(*SITES, secure=True)


@pytest.fixture
def site_keys(consortium_keys):
    return {s: keys.load_public_key(consortium_keys.site_keys[s][1]) for s in SITES}


def truth(running, shape):
    return sum(np.bincount(g.guard._table.cell_index(("age", "sex"), shape, (None, None)), minlength=math.prod(shape))
               for g in running)


def test_a_sum_with_a_dropped_site_is_read_from_the_survivors_and_carries_the_planned_noise(
        four, dictionary, sign, coordinator_key, site_keys):
    rho = 0.03
    signed = enroll_all(four, sign(secure_plan(dictionary, [(("age", "sex"), rho)], dropouts=1)))
    survivors, lost = four[:3], four[3]  # va enrolled, then crashed before answering
    replies = [g.stub.Answer(signed) for g in survivors]
    results = [verify_summary(r, signed, dictionary, site_keys) for r in replies]
    plan = pb.QueryPlan.FromString(signed.plan)
    shape = tuple(results[0].summary.marginals[0].shape)
    cells = math.prod(shape)
    for r in results:
        t = r.summary.marginals[0]
        # each share is sized for n - d = 3 honest sites, and charged that bound
        assert t.noise_scale == pytest.approx(accounting.share_scale_for_rho(rho, 3, cells), rel=1e-12)
        assert t.rho == pytest.approx(accounting.distributed_rho(t.noise_scale, 3, cells), rel=1e-12) and t.rho <= rho
        assert (r.receipt.parties, r.receipt.dropouts) == (4, 1)
        assert [s.recipient for s in r.summary.shares] == sorted(set(SITES) - {r.site})
    # the three survivors' noise alone is the planned noise
    planned = accounting.scale_for_rho(rho) ** 2
    assert sum(r.summary.marginals[0].noise_scale ** 2 for r in results) >= planned * (1 - 1e-9)
    with pytest.raises(ValueError, match="before its masks are removed"):
        aggregate(plan, results, dictionary)
    request = reveal_request(signed, results, [r.site for r in results], ["va"], coordinator_key, confirm_by=survivors)
    # whoever reaches a guard port without the coordinator's key cannot use up (or make) a reveal
    forged = pb.SignedPlan()
    forged.CopyFrom(request)
    forged.recovery.signature = ed25519.Ed25519PrivateKey.generate().sign(forged.recovery.statement)
    assert "BAD_SIGNATURE" in refused(survivors[0].stub.Reveal, forged)
    plan_sha = hashlib.sha256(signed.plan).digest()
    reveals = dict(verify_reveal(g.stub.Reveal(request), site_keys, plan_sha, request.recovery.statement,
                                 [r.site for r in results], ["va"]) for g in survivors)
    roster = {k.site: bytes(k.public_key) for k in signed.roster}
    correction = secagg.correction(plan_sha, roster, 1, sorted(reveals), ["va"], reveals, cells)
    summed = aggregate(plan, results, dictionary, correction=correction)[0]
    exact = truth(survivors, shape)
    sd = math.sqrt(summed.variance)
    assert np.all(np.abs(summed.values.ravel() - exact) < 6 * sd + 1)
    assert np.mean(np.abs(summed.values.ravel() - exact)) < 2 * sd  # noise, not masks
    # reveals cost nothing, and a guard reveals once
    spent = [g.guard.ledger.spent() for g in survivors]
    assert "holds no answer of this plan" in refused(survivors[0].stub.Reveal, request)
    assert [g.guard.ledger.spent() for g in survivors] == spent and lost.guard.ledger.spent() == 0
    assert "holds no answer" in refused(lost.stub.Reveal, request)  # va never answered: nothing to reveal


def test_without_dropouts_the_reveal_only_removes_the_self_masks(four, dictionary, sign, coordinator_key, site_keys):
    signed = enroll_all(four, sign(secure_plan(dictionary, [(("age", "sex"), 0.03)], dropouts=1)))
    results = [verify_summary(g.stub.Answer(signed), signed, dictionary, site_keys) for g in four]
    plan = pb.QueryPlan.FromString(signed.plan)
    shape = tuple(results[0].summary.marginals[0].shape)
    # the plain sum of the four masked tables is not the counts: each carries a self-mask
    raw = secagg.unmasked_sum([r.summary.marginals[0].masked for r in results])
    assert np.mean(np.abs(raw) > 1e12) > 0.9
    request = reveal_request(signed, results, list(SITES), [], coordinator_key, confirm_by=four[1:])
    plan_sha = hashlib.sha256(signed.plan).digest()
    # three reveals (the threshold n - d) are enough: the fourth site may drop now
    reveals = dict(verify_reveal(g.stub.Reveal(request), site_keys, plan_sha, request.recovery.statement, list(SITES), [])
                   for g in four[1:])
    roster = {k.site: bytes(k.public_key) for k in signed.roster}
    with pytest.raises(secagg.RecoveryError, match="do not suffice"):
        secagg.correction(plan_sha, roster, 1, list(SITES), [], dict(list(reveals.items())[:2]), math.prod(shape))
    correction = secagg.correction(plan_sha, roster, 1, list(SITES), [], reveals, math.prod(shape))
    summed = aggregate(plan, results, dictionary, correction=correction)[0]
    assert np.all(np.abs(summed.values.ravel() - truth(four, shape)) < 6 * math.sqrt(summed.variance) + 1)


def test_a_guard_never_reveals_for_a_site_that_answered(four, dictionary, sign, coordinator_key, site_keys):
    signed = enroll_all(four, sign(secure_plan(dictionary, [(("age", "sex"), 0.03)], dropouts=1)))
    results = [verify_summary(g.stub.Answer(signed), signed, dictionary, site_keys) for g in four]
    names = [r.site for r in results]
    # the coordinator calls va dropped but forwards va's sealed share (sent only with an answer): refused
    lie = reveal_request(signed, results, names[:3], ["va"], coordinator_key, confirm_by=four[:3])
    assert "SECURE_AGGREGATION: the recovery statement lists 'va' as dropped, but its answer's sealed share is here" \
        in refused(four[0].stub.Reveal, lie)
    # and that guard's reveal is spent: asking again gets nothing
    assert "holds no answer" in refused(four[0].stub.Reveal, lie)
    # a guard told that it dropped itself, though it answered, confirms nothing
    assert "lists this site as dropped" in refused(four[3].stub.Confirm, lie)
    # another story for the others: they confirmed the first one, and confirm one statement only
    honest = reveal_request(signed, results, names, [], coordinator_key)
    assert "already confirmed another recovery statement" in refused(four[1].stub.Confirm, honest)
    assert "did not confirm this recovery statement" in refused(four[1].stub.Reveal, honest)
    # va confirms the honest story, but one confirmation is not the threshold: two stories cannot both be revealed for
    honest.recovery.confirmations.append(four[3].stub.Confirm(honest))
    assert "1 survivor(s) confirmed the recovery statement; revealing needs 3" in refused(four[3].stub.Reveal, honest)
    # more dropped than the plan tolerates, or a statement not signed by the plan's coordinator
    assert "tolerates 1" in refused(four[2].stub.Confirm, reveal_request(signed, results, names[:2], names[2:],
                                                                          coordinator_key, forward=names[:2]))
    forged = reveal_request(signed, results, names, [], ed25519.Ed25519PrivateKey.generate())
    assert "BAD_SIGNATURE" in refused(four[2].stub.Confirm, forged)
    assert all(g.guard.ledger.spent() == pytest.approx(results[0].receipt.rho_debited) for g in four)


def test_forged_confirmations_do_not_count(four, dictionary, sign, coordinator_key, site_keys):
    signed = enroll_all(four, sign(secure_plan(dictionary, [(("sex",), 0.03)], dropouts=1)))
    results = [verify_summary(g.stub.Answer(signed), signed, dictionary, site_keys) for g in four]
    request = reveal_request(signed, results, list(SITES), [], coordinator_key, confirm_by=four[:2])
    fake = pb.Confirmation()
    fake.CopyFrom(request.recovery.confirmations[0])
    fake.site = "switzerland"  # cleveland's signature passed off as switzerland's
    request.recovery.confirmations.append(fake)
    assert "the confirmation of 'switzerland' does not verify" in refused(four[0].stub.Reveal, request)


def test_a_hidden_answer_stays_masked_when_its_site_is_called_dropped(four, dictionary, sign, coordinator_key, site_keys):
    """The coordinator hides va's answer and tells every other site that va dropped (forwarding nothing of
    va's): it gets their pair seeds with va, but not va's self-mask shares, so va's table stays masked."""
    signed = enroll_all(four, sign(secure_plan(dictionary, [(("age", "sex"), 0.03)], dropouts=1)))
    results = [verify_summary(g.stub.Answer(signed), signed, dictionary, site_keys) for g in four]
    names = [r.site for r in results]
    request = reveal_request(signed, results, names[:3], ["va"], coordinator_key, forward=names[:3], confirm_by=four[:3])
    plan_sha = hashlib.sha256(signed.plan).digest()
    reveals = dict(verify_reveal(g.stub.Reveal(request), site_keys, plan_sha, request.recovery.statement, names[:3], ["va"])
                   for g in four[:3])
    assert all("va" not in [s.owner for s in rv.shares] for rv in reveals.values())
    va = results[3].summary.marginals[0]
    n = len(va.masked)
    pairs = np.zeros(n, dtype=np.uint64)  # every pair mask of va's, from the others' seeds
    for site, rv in reveals.items():
        pairs += secagg.pair_pad("va", site, next(s.seed for s in rv.seeds if s.peer == "va"), n)
    left = (np.asarray(va.masked, dtype=np.uint64) - pairs).view(np.int64)
    assert np.mean(np.abs(left) > 1e12) > 0.9  # still the self-mask: nothing like counts


def test_a_roster_too_small_for_the_declared_dropouts_is_refused_before_any_debit(four, dictionary, sign, monkeypatch):
    # 4 sites, 2 dropouts: the survivors could be 2, below min_parties 3
    signed = enroll_all(four, sign(secure_plan(dictionary, [(("sex",), 0.01)], dropouts=2)))
    assert "tolerating 2 dropout(s) leaves 2; the sum needs at least 3" in refused(four[0].stub.Answer, signed)
    # 4 sites, 1 dropout, 1 colluder: a threshold of 3 that the colluder, the hidden site and one site it is told
    # dropped could reach together
    signed = enroll_all(four, sign(secure_plan(dictionary, [(("sex",), 0.01)], dropouts=1, colluding=1)))
    assert "threshold of 3 shares; with 1 colluding site(s) it must be at least 4" in refused(four[1].stub.Answer, signed)
    # a roster too large to share seeds among within the guards' message limit
    monkeypatch.setattr(secagg, "MAX_SHARING_ROSTER", 3)
    signed = enroll_all(four, sign(secure_plan(dictionary, [(("sex",), 0.01)], dropouts=1)))
    assert "shares self-mask seeds among at most 3" in refused(four[2].stub.Answer, signed)
    assert all(g.guard.ledger.spent() == 0 for g in four)


# ------------------------------------------------------------------ releases
class CrashesAfterEnrolling(InProcessTransport):
    """Sites in `lost` enroll in the first secure round and crash before answering it (their guards are
    never asked to answer: nothing is debited there); later rounds reach them again."""

    def __init__(self, guards, lost, silent=()):
        super().__init__(guards)
        self.lost, self.silent, self.done = set(lost), set(silent), False

    def query(self, plan, timeout, progress, kind="summary", to=None):
        if kind == "reveal" and self.silent:  # e.g. a guard restarted after answering: its key is gone
            replies, failures = super().query(plan, timeout, progress, kind, (to or set(self.guards)) - self.silent)
            return replies, failures + [SiteFailure(s, "GUARD_UNAVAILABLE", "unreachable") for s in sorted(self.silent)]
        if kind != "summary" or not plan.roster or self.done:
            return super().query(plan, timeout, progress, kind, to)
        self.done = True
        replies, failures = super().query(plan, timeout, progress, kind, (to or set(self.guards)) - self.lost)
        return replies, failures + [SiteFailure(s, "TIMEOUT", "no reply within 300 s") for s in sorted(self.lost)]


def in_process(tmp_path, demo, consortium_keys, **options):
    """Four in-process guards and a secure release job tolerating 1 dropout unless `options` say otherwise."""
    options.setdefault("dropouts", 1)
    return (site_guards(tmp_path, demo, consortium_keys, SITES),
            secure_job(tmp_path, demo, consortium_keys, SITES, **options))


@pytest.fixture(scope="module")
def dropped_release(tmp_path_factory, demo, consortium_keys):
    """Four sites tolerating 1 dropout; va enrolls in round 2 (at epsilon 1 the 1-way tables, as one secure
    sum) and crashes before answering."""
    from ppsehr.server.pipeline import Events, run_release

    tmp = tmp_path_factory.mktemp("dropped")
    guards, job = in_process(tmp, demo, consortium_keys)
    messages = []
    manifest = run_release(job, CrashesAfterEnrolling(guards, {"va"}), Events(echo=messages.append))
    return tmp / "rel", manifest, guards, messages


def test_a_release_with_a_dropped_site_is_readable_states_what_happened_and_verifies(dropped_release):
    path, manifest, guards, messages = dropped_release
    small, second, *later = manifest["plans"]
    assert "secure" not in small and second["round"] == 2
    sec = second["secure"]
    assert (sec["dropouts"], sec["threshold"]) == (1, 3)
    rec = sec["recovery"]
    assert rec["dropped"] == ["va"] and rec["survivors"] == ["cleveland", "hungarian", "switzerland"]
    assert rec["recovered"] is True and rec["revealed_by"] == rec["confirmed_by"] == rec["survivors"]
    # the later rounds are secure sums of the three that answered round 2 (va, back, is left out at no cost);
    # three sites with min_parties 3 tolerate no dropout, so they go without one
    for third in later:
        assert sorted(k["site"] for k in third["secure"]["roster"]) == rec["survivors"]
        assert "dropouts" not in third["secure"] and "recovery" not in third["secure"]
    assert {(f["site"], f["round"]): f["code"] for f in manifest["sites_not_included"]} == {
        ("va", 2): "TIMEOUT"} | {("va", p["round"]): "NOT_IN_ROSTER" for p in later}
    # nothing was charged for nothing: every survivor's round-2 receipt is used, and states the tolerance
    assert not any(f["code"] == "SUM_INCOMPLETE" for f in manifest["sites_not_included"])
    assert all(r["used"] for r in manifest["receipts"])
    assert all(r["dropouts"] == 1 for r in manifest["receipts"] if r["plan_id"] == second["plan_id"])
    assert manifest["privacy"]["rho_charged_for_nothing_max"] == 0
    assert [(t["round"], t["dropped"]) for t in manifest["privacy"]["secure_dropouts"]] == [(2, ["va"])]
    assert "va enrolled but did not answer, and its sum was read over the other 3 sites." in manifest["privacy"]["statement"]
    for site, guard in guards.items():  # every ledger is what the release says (va paid for the small per-site tables only)
        assert guard.ledger.spent() == pytest.approx(manifest["sites"][site]["rho"], rel=1e-12)
        assert manifest["sites"][site]["rho"] <= 1.0 * 1.0001 or site == "va"
    assert manifest["sites"]["va"]["plans"] == 1
    assert any("masks removed with the reveals of 3 site(s)" in m for m in messages)
    assert verify_release(path)["release_id"] == manifest["release_id"]


def test_the_model_covers_the_sites_of_the_survivors_sum(dropped_release):
    """A secure sum cannot be cut down: the release models the three sites whose sums were read, with
    every selected pair, and va's plain tables (the small per-site ones) are left out rather than read against sums
    without va."""
    import json

    path, manifest, _, _ = dropped_release
    aggregates = json.loads((path / "aggregates.json").read_text())["marginals"]
    pairs = [m for m in aggregates if len([v for v in m["variables"] if v != "site"]) == 2]
    assert len(pairs) >= len([m for m in manifest["plans"][-1]["marginals"] if len(m["variables"]) == 2])
    labels = {c for m in aggregates if m["variables"][0] == "site" for c in m["cells"][0]}
    assert "va" not in labels and labels <= {"cleveland", "hungarian", "switzerland"}
    if not labels:  # no site effects selected this time (a noisy decision): the pooled tables leave va out
        rows = {"cleveland": 303, "hungarian": 294, "switzerland": 123, "va": 200}
        one_way = [m for m in aggregates if len(m["variables"]) == 1]
        totals = [sum(m["counts"]) for m in one_way]
        sd = [3 * (sum(m["variance"]) ** 0.5) for m in one_way]
        survivors = sum(rows.values()) - rows["va"]
        assert one_way and all(abs(t - survivors) <= max(s, 60) for t, s in zip(totals, sd)), (totals, sd)


@pytest.mark.parametrize("change, match", [
    (lambda m: m["plans"][1]["secure"]["recovery"]["reveals"].pop(), "does not follow"),
    (lambda m: m["plans"][1]["secure"]["recovery"]["confirmations"].pop(), "does not follow"),
    (lambda m: m["plans"][1]["secure"]["recovery"]["confirmations"][0].update(site="va"), "confirmation"),
    (lambda m: m["plans"][1]["secure"].update(threshold=4), "does not follow"),
    (lambda m: m["plans"][1]["secure"].pop("dropouts"), "other secure-aggregation terms"),
    (lambda m: m["plans"][1]["secure"]["recovery"].update(dropped=[], survivors=["cleveland", "hungarian", "switzerland",
                                                                                 "va"]), "does not follow"),
    (lambda m: m["privacy"].update(secure_dropouts=[]), "does not follow"),
])
def test_a_coordinator_cannot_misstate_a_recovery(dropped_release, tmp_path, consortium_keys, change, match):
    copy = tmp_path / "copy"
    shutil.copytree(dropped_release[0], copy)
    edit_manifest(copy, change)
    resign_manifest(copy, consortium_keys.coordinator_key)
    with pytest.raises(ReleaseError, match=match):
        verify_release(copy)


def test_a_recovery_statement_calling_a_site_that_answered_dropped_does_not_verify(dropped_release, tmp_path,
                                                                                  consortium_keys, coordinator_key):
    copy = tmp_path / "copy"
    shutil.copytree(dropped_release[0], copy)

    def lie(m):  # a re-signed statement listing cleveland (whose receipt is in the release) as dropped
        entry = m["plans"][1]
        plan_sha = bytes.fromhex(entry["sha256"])
        roster = {k["site"]: keys.unb64(k["public_key"]) for k in entry["secure"]["roster"]}
        statement = secagg.statement_bytes(plan_sha, roster, ["hungarian", "switzerland", "va"], ["cleveland"])
        entry["secure"]["recovery"].update(statement=keys.b64(statement), signature=keys.b64(coordinator_key.sign(statement)),
                                           survivors=["hungarian", "switzerland", "va"], dropped=["cleveland"], reveals=[],
                                           revealed_by=[], recovered=False, confirmations=[], confirmed_by=[])
    edit_manifest(copy, lie)
    resign_manifest(copy, consortium_keys.coordinator_key)
    with pytest.raises(ReleaseError, match="'cleveland' answered plan .* lists it as dropped"):
        verify_release(copy)


def test_more_dropouts_than_declared_lose_the_round_with_its_cost_stated(tmp_path, demo, consortium_keys):
    from ppsehr.server.pipeline import Events, run_release

    guards, job = in_process(tmp_path, demo, consortium_keys)
    messages = []
    manifest = run_release(job, CrashesAfterEnrolling(guards, {"switzerland", "va"}), Events(echo=messages.append))
    wasted = [f for f in manifest["sites_not_included"] if f["code"] == "SUM_INCOMPLETE"]
    assert sorted((f["round"], f["site"]) for f in wasted) == [(2, "cleveland"), (2, "hungarian")]
    assert all("switzerland, va did not answer, more than the 1 dropout(s) the plan tolerates" in f["message"]
               and f["charged"].startswith("yes") for f in wasted)
    assert any("more than the 1 dropout(s)" in m for m in messages)
    assert "recovery" not in manifest["plans"][1]["secure"]  # nobody was asked to reveal anything
    for site in ("cleveland", "hungarian"):
        entry = manifest["sites"][site]
        assert entry["rho_charged_for_nothing"] > 0
        assert guards[site].ledger.spent() == pytest.approx(entry["rho"], rel=1e-12)
    assert "could not be read" in manifest["privacy"]["statement"]
    assert verify_release(tmp_path / "rel")["release_id"] == manifest["release_id"]


def test_a_tolerance_the_roster_cannot_carry_is_refused_before_anybody_pays(tmp_path, demo, consortium_keys):
    from ppsehr.server.pipeline import Events, run_release

    guards, job = in_process(tmp_path, demo, consortium_keys, dropouts=2)  # 4 sites - 2 < min_parties 3
    messages = []
    manifest = run_release(job, InProcessTransport(guards), Events(echo=messages.append))
    assert any("tolerating 2 dropout(s) leaves 2, and 4 are needed" in m and "nothing was debited" in m for m in messages)
    assert {(f["site"], f["code"]) for f in manifest["sites_not_included"]} == {(s, "NOT_SENT") for s in SITES}
    assert all(f["charged"].startswith("no") for f in manifest["sites_not_included"])
    for site, guard in guards.items():  # the small and the full 1-way tables (per site after all) only
        assert manifest["sites"][site]["plans"] == 2
        assert guard.ledger.spent() == pytest.approx(manifest["sites"][site]["rho"], rel=1e-12)
    assert verify_release(tmp_path / "rel")["release_id"] == manifest["release_id"]


def test_the_coordinator_cli_declares_dropouts_and_the_relay_carries_reveals(guards, dictionary, sign):
    from ppsehr.client.relay import relay_plan
    from ppsehr.deploy.cli import build_parser, job_options

    base = ["coordinator", "release", "--dictionary", "d.toml", "--out", "o", "--superlink", "127.0.0.1:1",
            "--signing-key", "k"]
    assert job_options(build_parser().parse_args(base + ["--dropouts", "1"]))["dropouts"] == 1
    assert job_options(build_parser().parse_args(base))["dropouts"] is None
    # query.reveal goes to the guard's Reveal: a guard that answered nothing has nothing to reveal (fixed code)
    g = guards("cleveland", secure=True)
    record = relay_plan(sign(secure_plan(dictionary, [(("sex",), 0.01)])).SerializeToString(), g.address, 10, "reveal")
    assert record["error_code"] == "SECURE_AGGREGATION" and "holds no answer of this plan" in record["error"]


def test_a_survivor_that_cannot_reveal_after_a_dropout_loses_the_round_with_its_cost_stated(tmp_path, demo,
                                                                                          consortium_keys):
    from ppsehr.server.pipeline import Events, run_release

    guards, job = in_process(tmp_path, demo, consortium_keys)
    manifest = run_release(job, CrashesAfterEnrolling(guards, {"va"}, silent={"cleveland"}), Events())
    rec = manifest["plans"][1]["secure"]["recovery"]
    assert rec["dropped"] == ["va"] and rec["recovered"] is False and rec["revealed_by"] == []
    assert len(rec["confirmed_by"]) == 3  # everyone confirmed; cleveland's reveal never came, and va's masks need it
    wasted = sorted(f["site"] for f in manifest["sites_not_included"] if f["code"] == "SUM_INCOMPLETE" and f["round"] == 2)
    assert wasted == ["cleveland", "hungarian", "switzerland"]
    assert all("the masks could not be removed (too few signed reveals); va did not answer" in f["message"]
               for f in manifest["sites_not_included"] if f["code"] == "SUM_INCOMPLETE")
    for site, guard in guards.items():
        assert guard.ledger.spent() == pytest.approx(manifest["sites"][site]["rho"], rel=1e-12)
    assert verify_release(tmp_path / "rel")["release_id"] == manifest["release_id"]


def test_a_pooled_release_survives_a_dropout_in_its_first_round(tmp_path, demo, consortium_keys):
    """With `site_variable = pooled` round 1 is a secure sum too: a site that drops out of it is left out of
    the later rounds, and the release models the sites that answered."""
    from ppsehr.server.pipeline import Events, run_release

    guards, job = in_process(tmp_path, demo, consortium_keys, site_variable="pooled")
    manifest = run_release(job, CrashesAfterEnrolling(guards, {"hungarian"}), Events())
    first = manifest["plans"][0]["secure"]
    assert first["recovery"]["dropped"] == ["hungarian"] and first["recovery"]["recovered"] is True
    assert all(sorted(k["site"] for k in p["secure"]["roster"]) == ["cleveland", "switzerland", "va"]
               for p in manifest["plans"][1:])
    assert "hungarian" not in manifest["sites"]  # no receipt of it in the release
    assert {(f["site"], f["round"]) for f in manifest["sites_not_included"]} >= {("hungarian", 1)}
    assert guards["hungarian"].ledger.spent() == 0  # it crashed before answering: never charged
    assert verify_release(tmp_path / "rel")["release_id"] == manifest["release_id"]
