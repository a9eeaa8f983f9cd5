"""Secure aggregation: pairwise masks, the distributed discrete Gaussian's accounting, the guard's
Enroll/Answer protocol over real gRPC, and releases whose joint tables are masked sums."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ppsehr.client.guard import Refusal, compile_plan
from ppsehr.common import accounting, keys, secagg
from ppsehr.common.errors import ReleaseError
from ppsehr.protos import guard_pb2 as pb
from ppsehr.server.measure.aggregate import aggregate, verify_summary
from ppsehr.server.release.bundle import verify_release
from ppsehr.deploy.transports import InProcessTransport
from ppsehr.server.measure.transport import SiteFailure

from conftest import edit_manifest, release_from_guards, resign_manifest

SITES = ("cleveland", "hungarian", "va")


# ------------------------------------------------------------------ masks and accounting
def test_pairwise_masks_cancel_in_the_sum_and_hide_each_table():
    plan_sha = hashlib.sha256(b"plan").digest()
    signing = {s: ed25519.Ed25519PrivateKey.generate() for s in "abcd"}
    sessions = {s: secagg.new_share(s, plan_sha, k) for s, k in signing.items()}
    roster = secagg.check_roster([share for _, share in sessions.values()], plan_sha,
                                 {s: k.public_key() for s, k in signing.items()})
    rng = np.random.default_rng(0)
    counts = {s: rng.integers(-20, 500, size=1000) for s in "abcd"}
    tables = {s: secagg.masked(counts[s], secagg.mask(s, sessions[s][0], roster, plan_sha, 1000)) for s in "abcd"}
    assert np.array_equal(secagg.unmasked_sum(list(tables.values())), sum(counts.values()))
    # one masked table says nothing visible about its counts: its top bits are coin flips
    top = (tables["a"] >> np.uint64(63)).astype(int)
    assert 400 < top.sum() < 600
    # any strict subset of the roster does not unmask
    assert not np.array_equal(secagg.unmasked_sum([tables[s] for s in "abc"]), sum(counts[s] for s in "abc"))
    # another plan's masks are unrelated
    other = secagg.mask("a", sessions["a"][0], roster, hashlib.sha256(b"other").digest(), 1000)
    assert not np.array_equal(other, secagg.mask("a", sessions["a"][0], roster, plan_sha, 1000))


def test_roster_checks_name_the_bad_entry():
    plan_sha = hashlib.sha256(b"plan").digest()
    signing = {s: ed25519.Ed25519PrivateKey.generate() for s in "ab"}
    known = {s: k.public_key() for s, k in signing.items()}
    a, b = (secagg.new_share(s, plan_sha, signing[s])[1] for s in "ab")
    forged = pb.KeyShare()
    forged.CopyFrom(b)
    forged.public_key = bytes(32)
    with pytest.raises(secagg.RosterError, match="'b': its signature does not verify"):
        secagg.check_roster([a, forged], plan_sha, known)
    with pytest.raises(secagg.RosterError, match="'a' twice"):
        secagg.check_roster([a, a], plan_sha, known)
    with pytest.raises(secagg.RosterError, match="another plan"):
        secagg.check_roster([a], hashlib.sha256(b"x").digest(), known)
    with pytest.raises(secagg.RosterError, match="not a site this party knows"):
        secagg.check_roster([a, b], plan_sha, {"a": known["a"]})
    # a peer that signs a degenerate key is refused when the masks are agreed (the guard does this before its debit)
    low_order = secagg.new_share("b", plan_sha, signing["b"])[1]
    low_order.public_key = bytes(32)
    low_order.signature = signing["b"].sign(secagg.share_statement("b", plan_sha, bytes(32)))
    roster = secagg.check_roster([a, low_order], plan_sha, known)
    with pytest.raises(secagg.RosterError, match="'b': its key gives no shared secret"):
        secagg.mask("a", X25519PrivateKey.generate(), roster, plan_sha, 4)


def test_the_coordinator_picks_a_roster_every_member_accepts():
    plan_sha = hashlib.sha256(b"plan").digest()
    names = "abcde"
    peers = {s: set(names) - {s} for s in names}
    peers["d"] -= {"c"}  # d's admin never listed c
    floors = dict.fromkeys(names, 3) | {"e": 9}  # e joins only sums of 9 or more
    shares = {s: secagg.new_share(s, plan_sha, ed25519.Ed25519PrivateKey.generate(), peers[s], floors[s])[1]
              for s in names}
    roster = secagg.agreeing(shares)
    assert roster in (["a", "b", "c"], ["a", "b", "d"])
    assert all(set(roster) - {s} <= set(shares[s].peers) and shares[s].min_parties <= len(roster) for s in roster)


def test_distributed_rho_is_opendps_map_at_the_combined_scale_plus_a_vanishing_correction():
    for scale in (0.7, 3.0, 40.0):
        assert accounting.distributed_rho(scale, 1, 100) == pytest.approx(accounting.rho_of_scales([scale]), rel=1e-12)
    # four honest sites at scale s cost what one site at 2s costs, plus a correction that vanishes for s >= 2
    assert accounting.distributed_rho(5.0, 4, 10_000) == pytest.approx(accounting.rho_of_scales([10.0]), rel=1e-12)
    assert accounting.distributed_rho(0.5, 4, 10_000) > 10 * accounting.rho_of_scales([1.0])  # small shares: no free lunch
    for rho, honest, cells in ((0.005, 4, 500), (0.5, 4, 5000), (0.2, 2, 10)):
        s = accounting.share_scale_for_rho(rho, honest, cells)
        assert accounting.distributed_rho(s, honest, cells) <= rho
        assert accounting.distributed_rho(s * (1 - 1e-6), honest, cells) > rho * (1 - 1e-5)  # and not much more noise
    with pytest.raises(ValueError):
        accounting.distributed_rho(1.0, 0, 10)


# ------------------------------------------------------------------ the guard's protocol
def secure_plan(dictionary, marginals, colluding=0, min_parties=3):
    plan = pb.QueryPlan(plan_id=f"s-{np.random.randint(1 << 62)}", coordinator="tester", purpose="secure test",
                        dictionary_hash=dictionary.hash,
                        marginals=[pb.MarginalQuery(variables=v, rho=r) for v, r in marginals])
    plan.secure.colluding, plan.secure.min_parties = colluding, min_parties
    return plan


def enroll_all(running, signed):
    roster = [g.stub.Enroll(signed) for g in running]
    out = pb.SignedPlan()
    out.CopyFrom(signed)
    out.roster.extend(roster)
    return out


def refused(call, signed):
    with pytest.raises(grpc.RpcError) as e:
        call(signed)
    return e.value.details().split(":")[0]


def test_a_secure_round_trip_reveals_only_the_sum_and_debits_the_distributed_loss(guards, dictionary, sign, consortium_keys):
    running = guards(*SITES, secure=True)
    marginals = [(("sex",), 0.01), (("age", "sex"), 0.03)]  # share scales above 2: the correction vanishes
    signed = enroll_all(running, sign(secure_plan(dictionary, marginals)))
    assert all(g.guard.ledger.spent() == 0 for g in running)  # enrolling costs nothing
    replies = [g.stub.Answer(signed) for g in running]
    site_keys = {s: keys.load_public_key(consortium_keys.site_keys[s][1]) for s in SITES}
    results = [verify_summary(r, signed, dictionary, site_keys) for r in replies]
    cells = [dictionary["sex"].size, dictionary["age"].size * dictionary["sex"].size]
    for g, r in zip(running, results):
        t = r.summary.marginals
        assert all(len(m.counts) == 0 and len(m.masked) == n for m, n in zip(t, cells))
        want = [accounting.distributed_rho(m.noise_scale, 3, n) for m, n in zip(t, cells)]
        assert [m.rho for m in t] == pytest.approx(want, rel=1e-12) and all(w <= r for w, (_, r) in zip(want, marginals))
        assert r.receipt.rho_debited == pytest.approx(math.fsum(want), rel=1e-12) == g.guard.ledger.spent()
        assert r.receipt.parties == 3 and r.receipt.colluding == 0
        assert r.receipt.rho_alone == pytest.approx(3 * r.receipt.rho_debited, rel=1e-6)  # each added a third of the noise
    sums = aggregate(pb.QueryPlan.FromString(signed.plan), results, dictionary)
    truth = sum(np.bincount(g.guard._table.cell_index(("age", "sex"), tuple(sums[1].values.shape), (None, None)),
                            minlength=cells[1]) for g in running)
    sd = math.sqrt(sums[1].variance)
    assert sums[1].variance == pytest.approx(sum(r.summary.marginals[1].noise_scale ** 2 for r in results))
    assert np.all(np.abs(sums[1].values.ravel() - truth) < 6 * sd + 1)  # the sum is the noisy true table
    assert abs(sums[0].values.sum() - truth.sum()) < 6 * math.sqrt(sums[0].variance * 2) + 1
    # a single site's masked table is nowhere near its counts
    alone = np.asarray(results[0].summary.marginals[1].masked, dtype=np.uint64).view(np.int64)
    assert np.mean(np.abs(alone) > 1e12) > 0.9


def test_secure_plans_that_must_not_be_answered_are_refused_without_debit(guards, dictionary, sign, site_config,
                                                                           consortium_keys):
    running = guards(*SITES, secure=True)
    plain_guard = guards("switzerland")
    marginals = [(("sex",), 0.1)]
    # a site without [secure_aggregation] does not enroll
    assert refused(plain_guard.stub.Enroll, sign(secure_plan(dictionary, marginals))) == "SECURE_AGGREGATION"
    # a plain plan is not enrolled, and does not come with a roster
    plain = sign(pb.QueryPlan(plan_id="plain-1", coordinator="t", dictionary_hash=dictionary.hash,
                              marginals=[pb.MarginalQuery(variables=["sex"], rho=0.1)]))
    assert refused(running[0].stub.Enroll, plain) == "SECURE_AGGREGATION"
    with_roster = enroll_all(running, sign(secure_plan(dictionary, marginals)))
    plain.roster.extend(with_roster.roster)
    assert refused(running[0].stub.Answer, plain) == "MALFORMED_PLAN"
    # answering a plan this guard never enrolled
    assert refused(running[0].stub.Answer, sign(secure_plan(dictionary, marginals))) == "SECURE_AGGREGATION"
    # a roster with one key replaced (a coordinator trying to isolate a site)
    signed = enroll_all(running, sign(secure_plan(dictionary, marginals)))
    signed.roster[1].public_key = bytes(32)
    assert refused(running[0].stub.Answer, signed) == "SECURE_AGGREGATION"
    # a peer that signs a degenerate key: refused when the masks are agreed, before the debit
    signed = enroll_all(running, sign(secure_plan(dictionary, marginals)))
    va = keys.load_signing_key(consortium_keys.site_keys["va"][0])
    signed.roster[2].public_key = bytes(32)
    signed.roster[2].signature = va.sign(secagg.share_statement("va", signed.roster[2].plan_sha256, bytes(32)))
    assert refused(running[0].stub.Answer, signed) == "SECURE_AGGREGATION"
    # a roster without this site's own key, or smaller than the sum needs
    signed = enroll_all(running, sign(secure_plan(dictionary, marginals)))
    own = signed.roster[0]
    del signed.roster[0]
    assert refused(running[0].stub.Answer, signed) == "SECURE_AGGREGATION"
    signed = enroll_all(running, sign(secure_plan(dictionary, marginals)))
    del signed.roster[2]
    assert refused(running[0].stub.Answer, signed) == "SECURE_AGGREGATION"
    # plans asking for fewer parties than the site's policy, or over the remaining budget
    assert refused(running[0].stub.Enroll, sign(secure_plan(dictionary, marginals, min_parties=2))) == "SECURE_AGGREGATION"
    assert refused(running[0].stub.Enroll, sign(secure_plan(dictionary, [(("sex",), 0.9)] * 5))) == "POLICY_LIMIT"
    assert all(g.guard.ledger.spent() == 0 for g in running)
    assert own.site == "cleveland"
    # a site that assumes a colluder refuses plans that count on everyone
    config = site_config("cleveland", secure=True)
    cautious = dataclasses.replace(config, secure_aggregation=dataclasses.replace(config.secure_aggregation, assume_colluding=1))
    with pytest.raises(Refusal, match="assumes up to 1"):
        compile_plan(secure_plan(dictionary, marginals), running[0].guard.dictionary, cautious)


def test_a_second_enroll_never_replaces_the_key_not_even_after_a_restart(guards, dictionary, sign, site_config):
    """Issue #14.5: whoever reaches the guard port with a captured signed plan cannot swap a site's one-time key."""
    from ppsehr.client.guard import SiteGuard

    running = guards(*SITES, secure=True)
    signed = sign(secure_plan(dictionary, [(("sex",), 0.01)]))
    first = running[0].stub.Enroll(signed)
    again = running[0].stub.Enroll(signed)  # e.g. the untrusted ClientApp replaying the plan
    assert again.public_key == first.public_key and again.signature == first.signature
    roster = enroll_all(running[1:], signed)
    roster.roster.insert(0, first)
    assert all(len(g.stub.Answer(roster).summary) > 0 for g in running)  # the round stays readable
    # a restarted guard (same ledger) refuses to enroll the plan again: its key is gone, and it never makes a new one
    other = sign(secure_plan(dictionary, [(("sex",), 0.01)]))
    running[1].stub.Enroll(other)
    restarted = SiteGuard(running[1].guard.config)
    with pytest.raises(Refusal, match="REPLAYED_PLAN: .* enrolled here before"):
        restarted.enroll(other)
    assert restarted.ledger.check() is None


def test_a_secure_table_is_charged_the_smaller_of_two_valid_bounds(guards, dictionary, sign):
    """Issue #14.7: at large rho per table the distributed bound's correction exceeds the site's own noise."""
    running = guards(*SITES, secure=True, epsilon=100.0, policy={"max_rho_per_plan": 10.0})
    signed = enroll_all(running, sign(secure_plan(dictionary, [(("sex",), 2.0), (("age", "sex"), 0.02)])))
    summaries = [pb.Summary.FromString(g.stub.Answer(signed).summary) for g in running]
    for s in summaries:
        rc = pb.BudgetReceipt.FromString(s.receipt)
        big, small = s.marginals
        own = accounting.rho_of_scales([big.noise_scale])
        assert accounting.distributed_rho(big.noise_scale, 3, 2) > own  # the correction dominates here
        assert big.rho == pytest.approx(own, rel=1e-12) and big.rho < 2.0  # charged its own noise: less than planned
        assert small.rho == pytest.approx(accounting.distributed_rho(small.noise_scale, 3, small.shape[0] * small.shape[1]))
        assert rc.bound == "minimum-per-table" and rc.rho_debited == pytest.approx(big.rho + small.rho, rel=1e-12)
        assert rc.rho_debited <= rc.rho_alone
    assert accounting.secure_table_rho(0.55, 3, 2)[1] == "own-noise"
    assert accounting.secure_table_rho(5.0, 3, 2)[1] == "distributed"


def test_a_key_masks_one_answer_only(guards, dictionary, sign):
    running = guards(*SITES, secure=True)
    signed = enroll_all(running, sign(secure_plan(dictionary, [(("sex",), 0.1)])))
    running[0].stub.Answer(signed)
    spent = running[0].guard.ledger.spent()
    assert refused(running[0].stub.Answer, signed) == "REPLAYED_PLAN"
    assert running[0].guard.ledger.spent() == spent


# ------------------------------------------------------------------ releases
@pytest.fixture(scope="module")
def secure_release(tmp_path_factory, demo, consortium_keys):
    return release_from_guards(tmp_path_factory.mktemp("secure"), demo, consortium_keys, SITES, 4.0, 4,
                               secure_aggregation=True, min_parties=3, report=False, formats=["csv"])


def test_a_release_with_secure_aggregation_verifies_and_states_its_trust_assumption(secure_release):
    path, manifest, _ = secure_release
    assert verify_release(path)["release_id"] == manifest["release_id"]
    small, first, second, third = manifest["plans"]
    # small per-site tables, then (at epsilon 4 the sites differ enough) per-site 1-way tables: site effects
    assert "secure" not in small and "secure" not in first
    # round 3 measures the 1-way tables again, as secure sums, next to the selected pairs
    assert len([m for m in third["marginals"] if len(m["variables"]) == 1]) == len(first["marginals"])
    for rnd in (second, third):
        assert sorted(k["site"] for k in rnd["secure"]["roster"]) == list(SITES) and rnd["secure"]["colluding"] == 0
    assert "secure sums" in manifest["privacy"]["secure_aggregation"]
    for site in SITES:
        entry = manifest["sites"][site]
        assert entry["rho"] <= accounting.rho_for_epsilon(4.0, 1e-6) * 1.0001 and entry["rho_if_others_collude"] > entry["rho"]
    assert all(r["parties"] == 3 for r in manifest["receipts"] if r["plan_id"] in (second["plan_id"], third["plan_id"]))


@pytest.mark.parametrize("change, match", [
    (lambda m: m["plans"][2]["secure"]["roster"].pop(), "roster or terms do not match"),
    (lambda m: m["plans"][2]["secure"]["roster"][0].update(public_key=keys.b64(bytes(32))), "roster does not verify"),
    (lambda m: m["plans"][2]["secure"].update(colluding=1), "other secure-aggregation terms"),
    (lambda m: m["plans"][1].update(secure=m["plans"][2]["secure"]), "claims secure aggregation"),
    (lambda m: m["sites"]["va"].update(rho_if_others_collude=m["sites"]["va"]["rho"]), "rho_if_others_collude does not match"),
])
def test_a_coordinator_cannot_misstate_a_secure_sum(secure_release, tmp_path, consortium_keys, change, match):
    copy = tmp_path / "copy"
    shutil.copytree(secure_release[0], copy)
    edit_manifest(copy, change)
    resign_manifest(copy, consortium_keys.coordinator_key)
    with pytest.raises(ReleaseError, match=match):
        verify_release(copy)


class DropsAnswer(InProcessTransport):
    """One site enrolls but its answer never arrives (a crash between the two calls)."""

    def __init__(self, guards, lost):
        super().__init__(guards)
        self.lost = lost

    def query(self, plan, timeout, progress, kind="summary", to=None):
        replies, failures = super().query(plan, timeout, progress, kind, to)
        if kind == "summary" and plan.roster:
            replies = [r for r in replies if r.where != self.lost]
            failures = failures + [SiteFailure(self.lost, "TIMEOUT", "no reply")]
        return replies, failures


def _in_process(tmp_path, demo, consortium_keys, secure_sites=SITES, min_parties=None):
    """In-process guards for SITES (those in `secure_sites` join secure sums) and a secure release job."""
    from ppsehr.client.config import load_site_config
    from ppsehr.client.guard import SiteGuard
    from ppsehr.deploy.local import write_site_config
    from ppsehr.server.pipeline import ReleaseJob

    guards = {}
    for site in SITES:
        peers = {p: consortium_keys.site_keys[p][1] for p in SITES if p != site} if site in secure_sites else None
        cfg = write_site_config(tmp_path / f"{site}.toml", site, demo / "dictionary.toml", demo / "sites" / f"{site}.toml",
                                tmp_path / "state" / site, "127.0.0.1:0", 10.0, 1e-6, consortium_keys.site_keys[site][0],
                                [consortium_keys.coordinator_pub], peers=peers, min_parties=(min_parties or {}).get(site, 3))
        guards[site] = SiteGuard(load_site_config(cfg))
    job = ReleaseJob.create(dictionary=str(demo / "dictionary.toml"), out=str(tmp_path / "rel"),
                     signing_key=str(consortium_keys.coordinator_key),
                     site_keys={s: str(consortium_keys.site_keys[s][1]) for s in SITES}, epsilon=1.0, seed=2,
                     secure_aggregation=True, report=False, formats=["csv"])
    return guards, job


def test_an_unreadable_secure_sum_is_reported_as_charged_and_the_release_goes_on(tmp_path, demo, consortium_keys):
    from ppsehr.server.pipeline import Events, run_release

    guards, job = _in_process(tmp_path, demo, consortium_keys)
    messages = []
    manifest = run_release(job, DropsAnswer(guards, "va"), Events(echo=messages.append))
    wasted = [f for f in manifest["sites_not_included"] if f["code"] == "SUM_INCOMPLETE"]
    # at epsilon 1 the 1-way tables are tried as a secure sum (round 2): unreadable, they go per site (round 3)
    # from the later rounds' share; every later secure sum is unreadable too, and is charged
    secure = [p["round"] for p in manifest["plans"] if p.get("secure")]
    assert secure[0] == 2 and "secure" not in manifest["plans"][2]
    assert sorted((f["round"], f["site"]) for f in wasted) == [(r, s) for r in secure for s in ("cleveland", "hungarian")]
    assert any("the 1-way tables per site, paid from the later rounds' share" in m for m in messages)
    assert all(guards[s].ledger.spent() == pytest.approx(job.rho_per_site(), rel=1e-9) for s in ("cleveland", "hungarian"))
    assert all(f["charged"].startswith("yes") and "va did not answer" in f["message"] for f in wasted)
    assert any("no candidates were measured" in m for m in messages)
    assert any(f"round {secure[-1]} was answered by no site" in m for m in messages)
    # the budget charged for the unreadable rounds is in the site's rho and the release's maximum, not only in text
    for site in ("cleveland", "hungarian"):
        entry = manifest["sites"][site]
        assert guards[site].ledger.spent() == pytest.approx(entry["rho"], rel=1e-12)
        assert entry["plans"] == len(manifest["plans"]) and entry["rho_charged_for_nothing"] > 0
    # va answered the plain rounds only (its secure answers were lost)
    plain = len(manifest["plans"]) - len(secure)
    assert manifest["sites"]["va"]["rho_charged_for_nothing"] == 0 and manifest["sites"]["va"]["plans"] == plain
    assert manifest["privacy"]["release_rho_max"] == max(s["rho"] for s in manifest["sites"].values())
    unused = [r for r in manifest["receipts"] if not r["used"]]
    assert sorted(r["site"] for r in unused) == sorted(["cleveland", "hungarian"] * len(secure))
    assert all(r["bound"] for r in unused)
    assert "charged for secure sums that could not be read" in manifest["privacy"]["statement"]
    assert verify_release(tmp_path / "rel")["release_id"] == manifest["release_id"]
    # a coordinator cannot drop the charged-for-nothing receipts (or the exclusion saying so)
    for change, match in ((lambda m: m.update(receipts=[r for r in m["receipts"] if r["used"]]), "does not follow|no receipt"),
                          (lambda m: m.update(sites_not_included=[f for f in m["sites_not_included"]
                                                                  if f["code"] != "SUM_INCOMPLETE"]), "does not say so"),
                          (lambda m: m["sites_not_included"].remove(
                              next(f for f in m["sites_not_included"] if f["site"] == "va")), "no sites_not_included entry for that site and round")):
        copy = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tmp_path / "rel", copy)
        edit_manifest(copy, change)
        resign_manifest(copy, consortium_keys.coordinator_key)
        with pytest.raises(ReleaseError, match=match):
            verify_release(copy)


def test_a_site_that_does_not_join_secure_sums_costs_the_others_nothing(tmp_path, demo, consortium_keys):
    from ppsehr.server.pipeline import Events, run_release

    guards, job = _in_process(tmp_path, demo, consortium_keys, secure_sites=("cleveland", "hungarian"))
    messages = []
    manifest = run_release(job, InProcessTransport(guards), Events(echo=messages.append))
    assert any("va cannot be in it" in m and "nothing was debited" in m for m in messages)
    # va refused to enroll; the other two then make too small a sum for their own min_parties (3)
    # (the 1-way tables, round 2, went per site after all; the candidates, round 3, were tried as a secure sum)
    assert {f["site"]: f["code"] for f in manifest["sites_not_included"]} == {
        "va": "SECURE_AGGREGATION", "cleveland": "NOT_IN_ROSTER", "hungarian": "NOT_IN_ROSTER"}
    assert {f["round"] for f in manifest["sites_not_included"]} <= {2, 3}
    assert all(f["charged"].startswith("no") for f in manifest["sites_not_included"])
    for site, guard in guards.items():  # the small and the full 1-way tables only: nobody paid for the secure round
        assert guard.ledger.spent() == pytest.approx(manifest["sites"][site]["rho"], rel=1e-12)
        assert manifest["sites"][site]["plans"] == 2


def test_a_site_whose_terms_do_not_fit_stops_the_secure_round_before_anyone_pays(tmp_path, demo, consortium_keys):
    from ppsehr.server.pipeline import Events, run_release

    guards, job = _in_process(tmp_path, demo, consortium_keys, min_parties={"cleveland": 4})  # 3 sites only
    messages = []
    manifest = run_release(job, InProcessTransport(guards), Events(echo=messages.append))
    assert any("cannot be in it" in m and "nothing was debited" in m for m in messages)
    # cleveland refuses to enroll; the other two would make too small a sum for their own min_parties
    assert {f["site"]: f["code"] for f in manifest["sites_not_included"]} == {
        "cleveland": "SECURE_AGGREGATION", "hungarian": "NOT_IN_ROSTER", "va": "NOT_IN_ROSTER"}
    for site, guard in guards.items():
        assert guard.ledger.spent() == pytest.approx(manifest["sites"][site]["rho"], rel=1e-12)  # round 1 only


def test_enrolled_plans_hold_their_budget_and_daily_slot(guards, dictionary, sign):
    g = guards("cleveland", secure=True, policy={"max_plans_per_day": 2})
    g.stub.Enroll(sign(secure_plan(dictionary, [(("sex",), 0.01)])))
    g.stub.Enroll(sign(secure_plan(dictionary, [(("sex",), 0.01)])))
    assert refused(g.stub.Enroll, sign(secure_plan(dictionary, [(("sex",), 0.01)]))) == "RATE_LIMITED"
    h = guards("va", secure=True, epsilon=3.0)
    half = 0.6 * h.guard.config.rho_limit
    h.stub.Enroll(sign(secure_plan(dictionary, [(("sex",), half)])))
    assert refused(h.stub.Enroll, sign(secure_plan(dictionary, [(("sex",), half)]))) == "OVER_BUDGET"
    assert g.guard.ledger.spent() == h.guard.ledger.spent() == 0


def test_shares_never_go_below_the_bounds_minimum_scale():
    assert accounting.share_scale_for_rho(50.0, 2, 1) >= accounting.MIN_SHARE_SCALE
    assert accounting.distributed_rho(accounting.share_scale_for_rho(50.0, 2, 1), 2, 1) <= 50.0
    with pytest.raises(ValueError, match="at least 0.5"):
        accounting.distributed_rho(0.4, 2, 1)
    assert accounting.distributed_rho(0.4, 1, 1) == pytest.approx(accounting.rho_of_scales([0.4]))


def test_secure_options_are_checked_before_anything_is_sent(tmp_path):
    from ppsehr.common.errors import PpsehrError
    from ppsehr.server.pipeline import ReleaseJob

    base = dict(dictionary="d", out=str(tmp_path / "o"), signing_key="k", site_keys={})
    for bad, match in (({"secure_aggregation": "yes"}, "true or false"), ({"colluding": 3}, "below min_parties"),
                       ({"min_parties": 1}, "at least 2")):
        with pytest.raises(PpsehrError, match=match):
            ReleaseJob.create(**base, **bad).validate()
