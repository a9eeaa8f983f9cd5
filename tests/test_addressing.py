"""No paid question to a site the coordinator cannot verify (issue 13, item 5).

A coordinator's typo in a site name or key used to cost that site budget: the site answered and
was charged, then its summary was rejected. Now every plan names its addressees (site, key
fingerprint) and a guard not among them refuses for free (NOT_ADDRESSED); and before the first
paid plan the coordinator checks the sites' signed identities against its --site-key list and
stops on a mismatch, before anything costs budget.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid

import grpc
import pytest

from conftest import RunningGuard, edit_manifest, resign_manifest
from ppsehr.client.config import load_site_config
from ppsehr.client.guard import SiteGuard
from ppsehr.client.relay import relay_plan
from ppsehr.common import addressing, keys
from ppsehr.common.errors import ReleaseError
from ppsehr.common.procs import free_port
from ppsehr.deploy.cli import main
from ppsehr.deploy.local import write_site_config
from ppsehr.deploy.transports import DirectTransport, InProcessTransport
from ppsehr.protos import guard_pb2 as pb
from ppsehr.server.measure import planner
from ppsehr.server.measure.identify import SiteMismatch
from ppsehr.server.pipeline import Events, ReleaseJob, run_release
from ppsehr.server.release.bundle import verify_release

SITES = ("cleveland", "hungarian", "va")


def plan_for(dictionary, addressees, plan_id=None):
    return pb.QueryPlan(plan_id=plan_id or uuid.uuid4().hex, dictionary_hash=dictionary.hash, coordinator="tester",
                        purpose="addressing test", expires_at=int(time.time()) + 600,
                        marginals=[pb.MarginalQuery(variables=["age"], rho=0.01)], addressees=addressees)


def fp(consortium_keys, site):
    return keys.fingerprint(keys.load_public_key(consortium_keys.site_keys[site][1]))


# ----------------------------------------------------------------------------- the guard
def test_a_guard_refuses_a_plan_not_addressed_to_it_for_free(guards, dictionary, coordinator_key, consortium_keys):
    g = guards("cleveland")
    ledger = g.guard.ledger
    before = len(ledger.audit_entries())
    me = fp(consortium_keys, "cleveland")
    cases = {  # a typo'd name with the right key, the right name with another site's key, nobody at all
        "typo": [pb.Addressee(site="clevland", signer=me), pb.Addressee(site="va", signer=fp(consortium_keys, "va"))],
        "key": [pb.Addressee(site="cleveland", signer=fp(consortium_keys, "va"))],
        "none": [],
    }
    for name, to in cases.items():
        signed = planner.sign_plan(plan_for(dictionary, to, plan_id=f"for-others-{name}"), coordinator_key)
        with pytest.raises(grpc.RpcError) as e:
            g.stub.Answer(signed, timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = e.value.details()
        assert details.startswith("NOT_ADDRESSED: this site is 'cleveland' with key " + me), details
        assert "nothing was debited" in details
        if name == "typo":
            assert "addressed to 'clevland' (" + me + "), 'va' (" in details
    assert ledger.spent() == 0 and ledger.debits() == []
    entries = ledger.audit_entries()[before:]
    assert [(e.event, e.code, e.plan_id) for e in entries] == [("refused", "NOT_ADDRESSED", f"for-others-{n}") for n in cases]
    # nothing was claimed: the same plan id, addressed to this site, is answered (and only then charged)
    signed = planner.sign_plan(plan_for(dictionary, [pb.Addressee(site="cleveland", signer=me)], plan_id="for-others-typo"),
                               coordinator_key)
    g.stub.Answer(signed, timeout=30)
    assert ledger.spent() > 0 and [d.plan_id for d in ledger.debits()] == ["for-others-typo"]


def test_enroll_refuses_a_secure_plan_not_addressed_to_it_and_holds_nothing(guards, dictionary, coordinator_key,
                                                                            consortium_keys):
    g = guards("va", secure=True)
    plan = plan_for(dictionary, [pb.Addressee(site="av", signer=fp(consortium_keys, "va"))], plan_id="secure-typo")
    plan.secure.colluding, plan.secure.min_parties = 0, 3
    with pytest.raises(grpc.RpcError) as e:
        g.stub.Enroll(planner.sign_plan(plan, coordinator_key), timeout=30)
    assert e.value.details().startswith("NOT_ADDRESSED: this site is 'va' with key ")
    assert not g.guard._sessions and g.guard.ledger.spent() == 0  # no key, no budget held
    del plan.addressees[:]
    plan.addressees.add(site="va", signer=fp(consortium_keys, "va"))  # the same plan id, addressed to it: enrolled
    share = g.stub.Enroll(planner.sign_plan(plan, coordinator_key), timeout=30)
    assert share.site == "va"


def test_identify_is_signed_over_the_challenge_and_costs_nothing(guards, dictionary, consortium_keys):
    g = guards("va")
    before = (g.guard.ledger.spent(), len(g.guard.ledger.audit_entries()))
    challenge = b"c" * 32
    ident = g.stub.Identify(pb.IdentityRequest(challenge=challenge), timeout=30)
    key = addressing.check_identity(ident, challenge)
    assert (ident.site, ident.signer, ident.dictionary_hash) == ("va", fp(consortium_keys, "va"), dictionary.hash)
    assert keys.fingerprint(key) == fp(consortium_keys, "va")
    with pytest.raises(addressing.IdentityError, match="another challenge"):
        addressing.check_identity(ident, b"d" * 32)  # a replayed identity does not answer a fresh challenge
    forged = pb.SiteIdentity()
    forged.CopyFrom(ident)
    forged.site = "cleveland"  # a site cannot claim another name with its signature
    with pytest.raises(addressing.IdentityError, match="signature"):
        addressing.check_identity(forged, challenge)
    with pytest.raises(grpc.RpcError) as e:
        g.stub.Identify(pb.IdentityRequest(challenge=b"short"), timeout=30)
    assert e.value.details().startswith("MALFORMED_PLAN: the identity request's challenge must be 16-64 bytes")
    # through the relay the Flower ClientApp runs
    record = relay_plan(pb.IdentityRequest(challenge=challenge).SerializeToString(), g.address, 10, "identify")
    assert addressing.check_identity(pb.SiteIdentity.FromString(record["reply"]), challenge)
    assert (g.guard.ledger.spent(), len(g.guard.ledger.audit_entries())) == before


def test_the_simulation_relay_answers_identify_in_process(site_config, tmp_path):
    from ppsehr.client.relay import relay_in_process

    site_config("hungarian")  # writes tmp_path/hungarian.toml
    challenge = bytes(range(32))
    record = relay_in_process(pb.IdentityRequest(challenge=challenge).SerializeToString(), str(tmp_path / "hungarian.toml"),
                              "identify")
    ident = pb.SiteIdentity.FromString(record["reply"])
    addressing.check_identity(ident, challenge)
    assert ident.site == "hungarian"
    assert relay_in_process(b"\xff\xff", str(tmp_path / "hungarian.toml"), "identify")["error_code"] == "MALFORMED_PLAN"


# ----------------------------------------------------------------------------- the coordinator
@pytest.fixture(scope="module")
def consortium(tmp_path_factory, demo, consortium_keys):
    """Three running gRPC guards (cleveland, hungarian, va), shared: the mismatch cases below must cost them nothing."""
    tmp = tmp_path_factory.mktemp("addressing")
    running = {}
    for site in SITES:
        cfg = write_site_config(tmp / f"{site}.toml", site, demo / "dictionary.toml", demo / "sites" / f"{site}.toml",
                                tmp / "state" / site, "127.0.0.1:0", 10.0, 1e-6, consortium_keys.site_keys[site][0],
                                [consortium_keys.coordinator_pub])
        running[site] = RunningGuard(SiteGuard(load_site_config(cfg)))
    yield running
    for g in running.values():
        g.stop()


def release_job(tmp, demo, consortium_keys, site_keys, **options):
    return ReleaseJob.create(dictionary=str(demo / "dictionary.toml"), out=str(tmp / "rel"),
                             signing_key=str(consortium_keys.coordinator_key), site_keys=site_keys, epsilon=1.0, seed=5,
                             report=False, formats=["csv"], **options)


def untouched(consortium):
    for site, g in consortium.items():
        assert g.guard.ledger.spent() == 0 and g.guard.ledger.debits() == [], site
        assert not [e for e in g.guard.ledger.audit_entries() if e.event != "policy"], site  # not even a refusal


@pytest.mark.parametrize("transport", ["direct", "in-process"])
@pytest.mark.parametrize("keys_of, expected", [
    # a typo in the name, with the site's right key (the measured failure: `--site-key wset=west.pub`)
    (lambda k, t: {"clevland": k["cleveland"], "hungarian": k["hungarian"], "va": k["va"]},
     ["site 'cleveland' answered, but no --site-key is given for it; its key {fp[cleveland]} is given as "
      "--site-key 'clevland' (did you mean 'cleveland'?)"]),
    # a typo in the name, and a key that is no site's
    (lambda k, t: {"clevland": t, "hungarian": k["hungarian"], "va": k["va"]},
     ["site 'cleveland' answered with key {fp[cleveland]}, but no --site-key is given for it; --site-key 'clevland' "
      "matches no site (did you mean 'cleveland'?)"]),
    # the right name with another site's key file
    (lambda k, t: {"cleveland": k["va"], "hungarian": k["hungarian"], "va": k["va"]},
     ["site 'cleveland' answered with key {fp[cleveland]}, but --site-key 'cleveland' is key {fp[va]}, the key of "
      "site 'va'"]),
    # two key files swapped
    (lambda k, t: {"cleveland": k["va"], "hungarian": k["hungarian"], "va": k["cleveland"]},
     ["site 'cleveland' answered with key {fp[cleveland]}, but --site-key 'cleveland' is key {fp[va]}, the key of "
      "site 'va'; its key is given as --site-key 'va' (a swapped or stale key file?)",
      "site 'va' answered with key {fp[va]}, but --site-key 'va' is key {fp[cleveland]}, the key of site 'cleveland'"]),
    # a site the coordinator holds no key for at all
    (lambda k, t: {"hungarian": k["hungarian"], "va": k["va"]},
     ["site 'cleveland' answered with key {fp[cleveland]}, but no --site-key is given for it"]),
])
def test_a_wrong_site_key_costs_nobody_anything(consortium, tmp_path, demo, consortium_keys, transport, keys_of, expected):
    stranger = keys.new_signing_key(tmp_path / "stranger", "signing")[1]
    site_keys = {s: str(p) for s, p in keys_of({s: consortium_keys.site_keys[s][1] for s in SITES}, stranger).items()}
    job = release_job(tmp_path, demo, consortium_keys, site_keys)
    t = (DirectTransport({s: g.address for s, g in consortium.items()}) if transport == "direct"
         else InProcessTransport({s: g.guard for s, g in consortium.items()}))
    messages = []
    with pytest.raises(SiteMismatch) as e:
        run_release(job, t, Events(echo=messages.append))
    text = str(e.value)
    assert text.startswith("the sites that answered do not match the --site-key list; no plan that costs budget was "
                           "sent and no site was charged:")
    fps = {s: fp(consortium_keys, s) for s in SITES}
    for line in expected:
        assert line.format(fp=fps) in text, text
    untouched(consortium)
    assert not (tmp_path / "rel").exists()
    assert not any("round 1" in m for m in messages)  # no plan was even signed


def test_the_right_keys_release_and_verify_and_a_silent_site_is_left_out_uncharged(consortium, tmp_path, demo,
                                                                                   consortium_keys, capsys):
    site_keys = {s: str(consortium_keys.site_keys[s][1]) for s in SITES}
    down = f"127.0.0.1:{free_port()}"  # hungarian's guard cannot be reached
    t = DirectTransport({"cleveland": consortium["cleveland"].address, "hungarian": down, "va": consortium["va"].address})
    only = DirectTransport({"hungarian": down})
    with pytest.raises(SiteMismatch, match="0 site\\(s\\) proved their identity; the release needs at least 1. No plan "
                                           "that costs budget was sent. hungarian: GUARD_UNAVAILABLE"):
        run_release(release_job(tmp_path, demo, consortium_keys, site_keys), only, Events())
    untouched(consortium)
    manifest = run_release(release_job(tmp_path, demo, consortium_keys, site_keys), t, Events())
    assert sorted(manifest["sites"]) == ["cleveland", "va"]
    for plan in manifest["plans"]:
        assert plan["addressees"] == [{"site": s, "signer": fp(consortium_keys, s)} for s in ("cleveland", "va")]
        assert pb.QueryPlan.FromString(keys.unb64(plan["signed_plan"])).addressees[0].site == "cleveland"
    left_out = [e for e in manifest["sites_not_included"] if e.get("site") == "hungarian"]
    assert [e["round"] for e in left_out] == [p["round"] for p in manifest["plans"]]
    assert all(e["code"] == "NOT_VERIFIED" and e["charged"] == "no (the plan was not sent to it to be answered)"
               and e["message"].startswith("not asked: it did not prove its identity") for e in left_out)
    assert consortium["hungarian"].guard.ledger.spent() == 0
    assert all(consortium[s].guard.ledger.spent() > 0 for s in ("cleveland", "va"))
    verify_release(tmp_path / "rel")
    pins = ["--coordinator-key", str(consortium_keys.coordinator_pub)] + [
        a for s in SITES for a in ("--site-key", f"{s}={consortium_keys.site_keys[s][1]}")]
    assert main(["release", "verify", str(tmp_path / "rel"), *pins]) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- verify
def test_verify_checks_the_addressees_against_the_signed_plans(one_release, tmp_path, consortium_keys):
    m = json.loads((one_release / "manifest.json").read_text())
    assert {a["site"] for a in m["plans"][0]["addressees"]} >= {"cleveland", "va"}
    copy = tmp_path / "rel"
    shutil.copytree(one_release, copy)
    edit_manifest(copy, lambda m: m["plans"][0]["addressees"].pop())
    resign_manifest(copy, consortium_keys.coordinator_key)
    with pytest.raises(ReleaseError, match="addressees"):
        verify_release(copy)
