"""Attacks on a site guard, each against a real gRPC guard (in-process or a separate process).

What test_guard.py already covers (forged/expired/unknown-signer plans, basic bad rho, width,
cells, lifetime budget, ledger-level thread race) is not repeated here; this file adds the
audit trail of those refusals, policy rules, hostile sizes, crashes, processes racing for the
last budget, fuzzing, error hygiene and tamper detection from the command line.
See docs/security.md for the threat model and the outcome of each attack.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import sqlite3
import sys
import threading
import time
import uuid

import grpc
import pytest

from ppsehr.client.config import load_site_config
from ppsehr.client.guard import SiteGuard
from ppsehr.client.ledger import Ledger, LedgerError
from ppsehr.client.relay import relay_plan
from ppsehr.common import accounting, keys
from ppsehr.deploy.cli import main
from ppsehr.deploy.local import write_site_config
from ppsehr.common.procs import ProcessGroup, free_port, wait_for_port
from ppsehr.common.refusals import MAX_PLAN_BYTES, REFUSAL_CODES
from ppsehr.protos import guard_pb2 as pb
from ppsehr.protos import guard_pb2_grpc as pb_grpc
from ppsehr.server.measure import planner

SECRET = "chol=SECRET-4242 at data row 17"  # stands for any data value an exception might carry


def make_plan(dictionary, marginals, plan_id=None, **fields):
    fields = {"coordinator": "tester", "purpose": "security test", "dictionary_hash": dictionary.hash, **fields}
    return pb.QueryPlan(plan_id=plan_id or uuid.uuid4().hex, **fields,
                        marginals=[pb.MarginalQuery(variables=v, rho=r) for v, r in marginals])


def refused(stub, signed):
    with pytest.raises(grpc.RpcError) as e:
        stub.Answer(signed, timeout=30)
    return e.value.code(), e.value.details()


def good(g, sign, dictionary, rho=0.001):
    """The guard is still up and answers a valid plan."""
    s = pb.Summary.FromString(g.stub.Answer(sign(make_plan(dictionary, [(["age"], rho)])), timeout=30).summary)
    return pb.BudgetReceipt.FromString(s.receipt)


def site_cfg(tmp_path, demo, consortium_keys, site="va", epsilon=10.0, policy=None, dictionary=None,
             coordinators=None, name=None):
    path = write_site_config(tmp_path / f"{name or site}.toml", site, dictionary or demo / "dictionary.toml",
                             demo / "sites" / f"{site}.toml", tmp_path / "state" / (name or site), "127.0.0.1:0",
                             epsilon, 1e-6, consortium_keys.site_keys[site][0],
                             coordinators or [consortium_keys.coordinator_pub], policy)
    return load_site_config(path)


# ----------------------------------------------------------------------------- refusals are audited
def test_refused_plans_cost_nothing_and_are_audited(guards, dictionary, sign, tmp_path):
    g = guards("cleveland")
    ledger = g.guard.ledger
    stranger = keys.load_signing_key(keys.new_signing_key(tmp_path, "stranger")[0])
    answered = sign(make_plan(dictionary, [(["age"], 0.01)], plan_id="once"))
    g.stub.Answer(answered)
    spent, debits = ledger.spent(), ledger.debits()
    cases = [  # (signed plan, code, plan id the audit entry names)
        (sign(make_plan(dictionary, [(["age"], 0.01)], plan_id="by-stranger"), key=stranger), "UNTRUSTED_SIGNER", "?"),
        (sign(make_plan(dictionary, [(["age"], 0.01)], plan_id="stale", expires_at=int(time.time()) - 5)),
         "PLAN_EXPIRED", "?"),
        (answered, "REPLAYED_PLAN", "?"),
        (sign(make_plan(dictionary, [(["age"], 0.01)], plan_id="other-dict", dictionary_hash="sha256:" + "1" * 64)),
         "DICTIONARY_MISMATCH", "other-dict"),
    ]
    before = len(ledger.audit_entries())
    for signed, code, _ in cases:
        assert refused(g.stub, signed)[1].startswith(code + ":")
    assert ledger.spent() == spent and ledger.debits() == debits
    entries = ledger.audit_entries()[before:]
    assert [(e.event, e.code, e.plan_id) for e in entries] == [("refused", c, p) for _, c, p in cases]
    assert entries[0].coordinator == keys.fingerprint(stranger.public_key())
    assert all(json.loads(e.detail)["reason"] for e in entries)
    assert ledger.check() is None


# ----------------------------------------------------------------------------- policy rules
@pytest.fixture
def tier3_dictionary(tmp_path, demo):
    """The demo dictionary with `thal` declared tier 3 (highly sensitive)."""
    text = (demo / "dictionary.toml").read_text()
    marker = 'categories = ["normal", "fixed_defect", "reversible_defect"]\ntier = 2'
    assert marker in text
    path = tmp_path / "dictionary-tier3.toml"
    path.write_text(text.replace(marker, marker[:-1] + "3"))
    return path


@pytest.mark.parametrize("policy, marginals, code, fragment", [
    ({"tier3": "deny"}, [(["thal"], 0.01)], "VARIABLE_NOT_ALLOWED", "not released by this site"),
    ({"tier3": "one-way"}, [(["thal", "age"], 0.01)], "VARIABLE_NOT_ALLOWED", "only released in 1-way marginals"),
    ({"allowed_variables": ["age", "sex"]}, [(["age"], 0.01), (["cp"], 0.01)], "VARIABLE_NOT_ALLOWED",
     "variable 'cp' is not allowed"),
    ({"max_total_cells": 60}, [(["age", "sex"], 0.01), (["chol", "sex"], 0.01), (["thalach", "sex"], 0.01)],
     "POLICY_LIMIT", "64 cells in all"),
    ({"max_rho_per_plan": 0.05}, [(["age"], 0.03), (["sex"], 0.03)], "POLICY_LIMIT", "at most 0.05 per plan"),
    ({"max_marginals": 2}, [(["age"], 0.01)] * 3, "POLICY_LIMIT", "at most 2"),
])
def test_policy_rules_are_enforced_and_audited(tmp_path, demo, consortium_keys, tier3_dictionary, sign, policy,
                                               marginals, code, fragment):
    from conftest import RunningGuard

    g = RunningGuard(SiteGuard(site_cfg(tmp_path, demo, consortium_keys, policy=policy, dictionary=tier3_dictionary)))
    try:
        d = g.guard.dictionary
        plan = make_plan(d, marginals)
        status, details = refused(g.stub, sign(plan))
        assert details.startswith(code + ":") and fragment in details, details
        last = g.guard.ledger.audit_entries()[-1]
        assert (last.event, last.code, last.plan_id) == ("refused", code, plan.plan_id)
        assert g.guard.ledger.spent() == 0.0
        good(g, sign, d)
        if policy.get("tier3") == "one-way":  # a tier-3 variable alone is fine under one-way
            g.stub.Answer(sign(make_plan(d, [(["thal"], 0.01)])))
    finally:
        g.stop()


def test_daily_plan_limit_holds_and_debits_name_the_policy_in_force(guards, dictionary, sign):
    g = guards("hungarian", policy={"max_plans_per_day": 3})
    for _ in range(3):
        good(g, sign, dictionary)
    status, details = refused(g.stub, sign(make_plan(dictionary, [(["age"], 0.001)])))
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED and details == "RATE_LIMITED: policy allows at most 3 plans per day"
    assert len(g.guard.ledger.debits()) == 3
    debit = next(e for e in g.guard.ledger.audit_entries() if e.event == "debit")
    [(digest, text)] = g.guard.ledger.policies().items()
    assert json.loads(debit.detail)["policy"] == digest[:16]
    recorded = json.loads(text)
    assert recorded["policy"]["max_plans_per_day"] == 3 and recorded["rho_limit"] == g.guard.config.rho_limit
    assert recorded["coordinators"] == sorted(g.guard._coordinators)


# ----------------------------------------------------------------------------- hostile plans
@pytest.fixture
def measurement_builds(monkeypatch):
    """Count OpenDP noise calibrations and measurement builds: the guard's expensive per-marginal work
    (the guard memoises both, so the count is of what it asks for, cached or not)."""
    from ppsehr.client import guard as guard_module

    calls = []
    for name in ("_scale_for_rho", "noisy_counts"):
        real = getattr(guard_module, name)
        monkeypatch.setattr(guard_module, name, lambda *a, real=real, name=name: calls.append((name, a)) or real(*a))
    return calls


def _hostile(d, case):
    """(plan, extra empty marginals, expected code, fragment of the message) for one hostile case."""
    wide = sorted(d.names, key=lambda n: -d[n].size)[:12]  # 12 variables: 1.7e9 cells
    return {
        "a million empty marginals (2 MB)": lambda: (make_plan(d, []), 10**6, "POLICY_LIMIT", "1000000 marginals"),
        "a 10^9-cell marginal": lambda: (make_plan(d, [(wide, 0.01)]), 0, "POLICY_LIMIT", "1710720000 cells"),
        "denormal rho": lambda: (make_plan(d, [(["age"], 5e-324)]), 0, "BAD_RHO", "at least 1e-09"),
        "tiny rho": lambda: (make_plan(d, [(["age"], 1e-300)]), 0, "BAD_RHO", "at least 1e-09"),
        "negative zero rho": lambda: (make_plan(d, [(["age"], -0.0)]), 0, "BAD_RHO", ""),
        "absurd rho": lambda: (make_plan(d, [(["age"], 1e308)]), 0, "POLICY_LIMIT", "per plan"),
        "rhos summing to infinity": lambda: (make_plan(d, [([n], 1e308) for n in d.names]), 0, "POLICY_LIMIT", "inf"),
        "a 1 MB variable name": lambda: (make_plan(d, [(["x" * 2**20], 0.01)]), 0, "UNKNOWN_VARIABLE", "..."),
        "a 1 MB plan id": lambda: (make_plan(d, [(["age"], 0.01)], plan_id="p" * 2**20), 0, "MALFORMED_PLAN", ""),
        "a 3 MB purpose": lambda: (make_plan(d, [(["age"], 0.01)], purpose="y" * 3 * 2**20), 0, "MALFORMED_PLAN",
                                   "purpose"),
        "100k variables in one marginal": lambda: (make_plan(d, [(["age"] * 100_000, 0.01)]), 0, "POLICY_LIMIT",
                                                   "100000 variables"),
    }[case]()


HOSTILE = ["a million empty marginals (2 MB)", "a 10^9-cell marginal", "denormal rho", "tiny rho", "negative zero rho",
           "absurd rho", "rhos summing to infinity", "a 1 MB variable name", "a 1 MB plan id", "a 3 MB purpose",
           "100k variables in one marginal"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_plans_are_refused_before_any_work(guards, dictionary, sign, measurement_builds, case):
    g = guards("switzerland", policy={"max_width": 16})  # width no longer stops the 10^9-cell marginal
    plan, empty_marginals, code, fragment = _hostile(dictionary, case)
    if empty_marginals:
        plan.marginals.extend([pb.MarginalQuery()] * empty_marginals)
    signed = sign(plan)
    assert len(signed.SerializeToString()) < MAX_PLAN_BYTES
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status, details = refused(g.stub, signed)
    assert details.startswith(code + ":") and fragment in details, details[:300]
    assert len(details) < 400  # refusals quote at most a short, truncated piece of the plan
    assert measurement_builds == []  # refused before any OpenDP measurement was built
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 300_000  # KiB: no memory blow-up
    last = g.guard.ledger.audit_entries()[-1]
    assert (last.event, last.code) == ("refused", code) and len(last.plan_id) <= 128 and len(last.detail) < 1000
    assert good(g, sign, dictionary).rho_spent_total == g.guard.ledger.spent() > 0
    assert measurement_builds  # ... and the counter does see a plan that is answered


def test_oversized_and_unsigned_huge_messages(guards, dictionary, sign, coordinator_key):
    g = guards("switzerland")
    huge = sign(make_plan(dictionary, [(["age"], 1e-6)] * 320_000))  # 4.5 MB: above the gRPC limit
    assert len(huge.SerializeToString()) > MAX_PLAN_BYTES
    status, details = refused(g.stub, huge)
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
    record = relay_plan(huge.SerializeToString(), g.address, 30)  # the relay refuses it before sending
    assert record["error_code"] == "PLAN_TOO_LARGE" and "reply" not in record
    forged = pb.SignedPlan(plan=b"\x00" * (2 * 2**20), signature=b"s" * 64, signer="z" * 2**20)
    status, details = refused(g.stub, forged)
    assert details.startswith("UNTRUSTED_SIGNER:") and len(details) < 300
    garbage = pb.SignedPlan(plan=b"\xff\xff\xff", signature=coordinator_key.sign(b"\xff\xff\xff"), signer=huge.signer)
    assert refused(g.stub, garbage)[1].startswith("MALFORMED_PLAN:")  # signed, but not a plan
    assert g.guard.ledger.spent() == 0.0
    good(g, sign, dictionary)


# ----------------------------------------------------------------------------- error hygiene
def _flower_reply(plan_bytes, address):
    """Run the Flower ClientApp's handler on one message, as a SuperNode would."""
    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

    from ppsehr.client import relay

    md = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="release",
                  created_at=time.time(), ttl=600.0, message_type="query.summary")
    msg = Message(RecordDict({"plan": ConfigRecord({"plan": plan_bytes, "guard-timeout": 30.0})}), metadata=md)
    ctx = Context(run_id=1, node_id=1, node_config={"guard-address": address}, state=RecordDict(), run_config={})
    return dict(relay.summary(msg, ctx).content.config_records["result"])


def test_no_exception_text_crosses_the_site_boundary(guards, dictionary, sign, monkeypatch, caplog):
    g = guards("va")

    def leak(*_):
        raise ValueError(SECRET)

    # 1. the data read fails after the debit: the budget is spent, the coordinator learns only a fixed code
    # (the guard counts every table of a plan in one pass over the rows: common/cells.py::count_tables)
    from ppsehr.common import cells

    monkeypatch.setattr(cells, "count_tables", leak)
    plan = sign(make_plan(dictionary, [(["chol"], 0.01)]))
    status, details = refused(g.stub, plan)
    assert status == grpc.StatusCode.INTERNAL
    assert details == "INTERNAL: measurement failed after the debit; the site admin has the details"
    assert g.guard.ledger.debits()[-1].plan_id == pb.QueryPlan.FromString(plan.plan).plan_id  # wasted, not overspent
    last = g.guard.ledger.audit_entries()[-1]
    assert (last.event, last.code) == ("failed", "INTERNAL") and "SECRET" not in last.detail
    assert SECRET in caplog.text  # the details stay in the site's own log
    # ... and through the Flower ClientApp relay, as the coordinator would see it
    reply = _flower_reply(sign(make_plan(dictionary, [(["chol"], 0.01)])).SerializeToString(), g.address)
    assert reply == {"error_code": "INTERNAL", "error": "measurement failed after the debit; the site admin has the details"}
    # 2. a failure before the debit (here: OpenDP calibration): refused, audited, nothing debited
    monkeypatch.undo()
    spent = g.guard.ledger.spent()
    from ppsehr.client import guard as guard_module

    monkeypatch.setattr(guard_module, "noisy_counts", leak)  # building the OpenDP measurement fails
    status, details = refused(g.stub, sign(make_plan(dictionary, [(["age"], 0.01)])))
    assert details == "INTERNAL: the guard failed; the site admin has the details (nothing was debited)"
    assert g.guard.ledger.spent() == spent and g.guard.ledger.audit_entries()[-1].code == "INTERNAL"
    monkeypatch.undo()
    # 3. the ledger is unreadable while describing the site
    monkeypatch.setattr(g.guard.ledger, "spent", lambda: (_ for _ in ()).throw(sqlite3.DatabaseError(SECRET)))
    with pytest.raises(grpc.RpcError) as e:
        g.stub.Describe(pb.DescribeRequest())
    assert e.value.details() == "INTERNAL: the guard failed; the site admin has the details"
    monkeypatch.undo()
    # 4. whatever the relay meets, its reply is a fixed code and message
    assert _flower_reply(b"\x08\x96\x01" * 10, "127.0.0.1:1")["error_code"] in ("MALFORMED_PLAN", "GUARD_UNAVAILABLE")
    assert _flower_reply(sign(make_plan(dictionary, [(["age"], 0.01)])).SerializeToString(), f"127.0.0.1:{free_port()}") \
        == {"error_code": "GUARD_UNAVAILABLE", "error": "the site guard could not be reached"}
    good(g, sign, dictionary)


def test_refusal_messages_quote_only_plan_and_policy(guards, dictionary, sign):
    """Every refusal message is built from the plan and the policy: none quotes the site table."""
    from ppsehr.common.mapping import load_mapping
    from ppsehr.common.source import load_site_table

    import re

    g = guards("cleveland", epsilon=0.5)
    table, _ = load_site_table(load_mapping(g.guard.config.mapping, dictionary), dictionary)
    plans = [make_plan(dictionary, m) for m in ([(["age"], 0.005)], [(["age"], 0.005)], [(["nope"], 0.01)],
                                                [(["age", "sex", "cp", "chol"], 0.01)], [(["age"], float("nan"))])]
    messages = []
    for p in plans:
        try:
            g.stub.Answer(sign(p))
        except grpc.RpcError as e:
            messages.append(e.details())
    assert [m.split(":", 1)[0] for m in messages] == ["OVER_BUDGET", "UNKNOWN_VARIABLE", "POLICY_LIMIT", "BAD_RHO"]
    plan_strings = {v for p in plans for mq in p.marginals for v in mq.variables}
    for m in messages:
        assert set(re.findall(r"'([^']*)'", m)) <= plan_strings  # whatever is quoted comes from the plan
        assert str(table.n_rows) not in re.findall(r"\d+", m)  # not even the row count


# ----------------------------------------------------------------------------- races across processes
def _serve(group, name, config_path, port):
    return group.start(name, [sys.executable, "-m", "ppsehr.deploy.cli", "site", "serve", "--config", str(config_path),
                              "--listen", f"127.0.0.1:{port}"])


def _hammer(address, signer, plans, results):
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.SiteGuardStub(channel)
        for p in plans:
            try:
                results.append(stub.Answer(signer(p), timeout=60))
            except grpc.RpcError as e:
                results.append(e.details().split(":", 1)[0])


def test_two_coordinators_racing_through_two_guard_processes_never_overspend(tmp_path, demo, dictionary,
                                                                             consortium_keys, sign):
    second_priv, second_pub = keys.new_signing_key(tmp_path / "coord2", "signing")
    second = keys.load_signing_key(second_priv)
    cfg = site_cfg(tmp_path, demo, consortium_keys, site="va", epsilon=1.0,
                   coordinators=[consortium_keys.coordinator_pub, second_pub], policy={"max_plans_per_day": 10000})
    ports = [free_port(), free_port()]
    results: list = []
    with ProcessGroup(tmp_path / "logs") as group:
        procs = [_serve(group, f"guard-{i}", cfg.source, port) for i, port in enumerate(ports)]
        for proc, port in zip(procs, ports):
            wait_for_port("127.0.0.1", port, 60, proc)
        signers = [sign, lambda p: sign(p, key=second)]
        threads = [threading.Thread(target=_hammer, args=(
            f"127.0.0.1:{ports[i % 2]}", signers[i // 2 % 2],
            [make_plan(dictionary, [(["age"], 0.0015)]) for _ in range(8)], results)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    answers = [pb.BudgetReceipt.FromString(pb.Summary.FromString(r.summary).receipt) for r in results
               if isinstance(r, pb.SignedSummary)]
    codes = [r for r in results if isinstance(r, str)]
    ledger = Ledger(cfg.ledger_path, cfg.rho_limit, "va")
    per_plan = answers[0].rho_debited
    assert len(results) == 32 and set(codes) == {"OVER_BUDGET"}
    assert len(answers) == math.floor(cfg.rho_limit / per_plan * (1 + 1e-12))  # every bit of budget used, no more
    assert ledger.spent() <= cfg.rho_limit and ledger.spent() == pytest.approx(math.fsum(a.rho_debited for a in answers))
    assert {a.coordinator for a in answers} <= {keys.fingerprint(keys.load_public_key(consortium_keys.coordinator_pub)),
                                                keys.fingerprint(second.public_key())}
    assert sorted(a.ledger_seq for a in answers) == [d.seq for d in ledger.debits()]
    assert ledger.check() is None


# ----------------------------------------------------------------------------- SIGKILL between debit and reply
ZYGOTE = r"""
import os, signal, sys
from ppsehr.client import guard
from ppsehr.client.config import load_site_config
config = load_site_config(sys.argv[1])
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps killed guards
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            guard.serve(config, address=line.strip())
        finally:
            os._exit(0)
    print(pid, flush=True)
"""


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sigkill_between_debit_and_reply_never_releases_an_unpaid_answer(tmp_path, demo, dictionary, consortium_keys,
                                                                        sign):
    """Kill a guard process with SIGKILL at random moments while plans are in flight, 16 times.

    Guards are forked from a process that has already imported the guard (so a restart costs
    ~0.3 s instead of ~2 s of imports); each is a real, separate `serve()` process on the ledger.
    """
    import subprocess

    cfg = site_cfg(tmp_path, demo, consortium_keys, site="va", epsilon=4.0, policy={"max_plans_per_day": 100000})
    site_pub = keys.load_public_key(consortium_keys.site_keys["va"][1])
    plan_marginals = planner.one_round_plan(dictionary, 0.005)  # 27 marginals: a real measurement window
    rng = random.Random(5)
    received: list[pb.SignedSummary] = []
    refusals: list[str] = []
    log = open(tmp_path / "guards.log", "w")
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, cfg.source], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=log, text=True, start_new_session=True)
    try:
        for round_ in range(16):
            port = free_port()
            zygote.stdin.write(f"127.0.0.1:{port}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            deadline = time.monotonic() + 30
            while not _port_open(port):
                assert _alive(pid) and time.monotonic() < deadline, \
                    f"guard did not restart in round {round_}: {(tmp_path / 'guards.log').read_text()[-3000:]}"
                time.sleep(0.01)
            stop = threading.Event()

            def client():
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    stub = pb_grpc.SiteGuardStub(ch)
                    while not stop.is_set():
                        plan = planner.to_proto(plan_marginals, dictionary, "tester", "kill test")
                        try:
                            received.append(stub.Answer(sign(plan), timeout=20))
                        except grpc.RpcError as e:
                            if e.code() == grpc.StatusCode.UNAVAILABLE:
                                return
                            refusals.append(e.details().split(":", 1)[0])
                            time.sleep(0.01)

            threads = [threading.Thread(target=client) for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.005)
            stop.set()
            for t in threads:
                t.join(30)
            assert Ledger(cfg.ledger_path, cfg.rho_limit, "va").check() is None  # intact after every crash
        # Finally one more restart, and spend what is left until the guard refuses.
        port = free_port()
        zygote.stdin.write(f"127.0.0.1:{port}\n")
        zygote.stdin.flush()
        pid = int(zygote.stdout.readline())
        wait_for_port("127.0.0.1", port, 30)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.SiteGuardStub(ch)
            while not refusals:
                try:
                    received.append(stub.Answer(sign(planner.to_proto(plan_marginals, dictionary, "t", "drain")), timeout=20))
                except grpc.RpcError as e:
                    refusals.append(e.details().split(":", 1)[0])
        os.kill(pid, signal.SIGKILL)
    finally:
        os.killpg(zygote.pid, signal.SIGKILL)
        zygote.wait(10)
        log.close()
    ledger = Ledger(cfg.ledger_path, cfg.rho_limit, "va")
    db = sqlite3.connect(cfg.ledger_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    assert ledger.verify_audit() is None and ledger.check() is None
    debits = {d.seq: d for d in ledger.debits()}
    for signed in received:  # every answer that left the guard was paid for first
        assert keys.verify(site_pub, signed.signature, signed.summary)
        rc = pb.BudgetReceipt.FromString(pb.Summary.FromString(signed.summary).receipt)
        d = debits[rc.ledger_seq]
        assert (d.plan_id, d.rho, d.total_after) == (rc.plan_id, rc.rho_debited, rc.rho_spent_total)
    assert ledger.spent() <= cfg.rho_limit * (1 + 1e-12)
    assert set(refusals) == {"OVER_BUDGET"}
    assert cfg.rho_limit - ledger.spent() < debits[max(debits)].rho  # drained: what is left buys no further plan
    unpaid = len(debits) - len(received)  # debited, then killed before the reply: budget wasted, never overspent
    print(f"\n{len(received)} answers received, {len(debits)} debits, {unpaid} debits lost to kills, "
          f"spent {ledger.spent():.4g} of {cfg.rho_limit:.4g}")
    assert unpaid >= 1, "no kill landed between a debit and its reply: the test did not exercise that window"


def _port_open(port):
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- fuzzing the gRPC API
def test_fuzz_guard_api(guards, dictionary, coordinator_key, sign):
    """Random bytes, random well-formed signed plans and bit-flipped signed plans: the guard never
    crashes, every error is a fixed code, and every answer has exactly its debit."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    g = guards("cleveland", epsilon=3.0, policy={"max_plans_per_day": 100000})
    raw = g.channel.unary_unary("/ppsehr.guard.v1.SiteGuard/Answer")  # bytes in, bytes out
    receipts: list[pb.BudgetReceipt] = []
    fuzz = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))

    def call(data: bytes):
        try:
            reply = pb.SignedSummary.FromString(raw(data, timeout=30))
        except grpc.RpcError as e:
            code, _, message = (e.details() or "").partition(":")
            assert code in REFUSAL_CODES or e.code() == grpc.StatusCode.INTERNAL, e.details()
            assert len(e.details()) < 2000
            return None
        assert keys.verify(keys.load_public_key(g.guard.config.signing_key.with_suffix(".pub")), reply.signature, reply.summary)
        receipts.append(pb.BudgetReceipt.FromString(pb.Summary.FromString(reply.summary).receipt))
        return reply

    @fuzz
    @given(st.binary(max_size=3000))
    def random_bytes(data):
        assert call(data) is None  # nothing unsigned is ever answered

    names = st.sampled_from(dictionary.names) | st.text(max_size=20)
    marginal = st.builds(lambda v, r: pb.MarginalQuery(variables=v, rho=r), st.lists(names, max_size=5),
                         st.floats(allow_nan=True, allow_infinity=True) | st.floats(1e-6, 0.05))
    wild = st.builds(lambda pid, h, ms, exp, purpose: pb.QueryPlan(
        plan_id=pid, dictionary_hash=h, marginals=ms, expires_at=int(time.time()) + exp, purpose=purpose, coordinator="fz"),
        st.uuids().map(str) | st.text(max_size=200), st.just(dictionary.hash) | st.text(max_size=80),
        st.lists(marginal, max_size=8), st.sampled_from([600, -10, 10**9, 0]), st.text(max_size=50))
    valid = st.builds(lambda pid, ms: pb.QueryPlan(plan_id=pid, dictionary_hash=dictionary.hash, coordinator="fz",
                                                   marginals=ms, expires_at=int(time.time()) + 600,
                                                   addressees=[pb.Addressee(site="cleveland", signer=g.guard.fingerprint)]),
                      st.uuids().map(str), st.lists(st.builds(
                          lambda v, r: pb.MarginalQuery(variables=v, rho=r),
                          st.lists(st.sampled_from(dictionary.names), min_size=1, max_size=3, unique=True),
                          st.floats(1e-5, 0.01)), min_size=1, max_size=6))
    plan = valid | wild

    @fuzz
    @given(plan)
    def well_formed(p):
        call(planner.sign_plan(p, coordinator_key).SerializeToString())

    @fuzz
    @given(plan, st.integers(0, 10**6), st.integers(1, 255))
    def flipped(p, position, bit):
        data = bytearray(planner.sign_plan(p, coordinator_key).SerializeToString())
        data[position % len(data)] ^= bit
        reply = call(bytes(data))
        if reply is not None:  # a flip that left plan and signature intact (e.g. in a tag); must still be paid for
            assert receipts[-1].plan_id == p.plan_id

    random_bytes()
    well_formed()
    flipped()
    ledger = g.guard.ledger
    debits = {d.seq: d for d in ledger.debits()}
    assert len(receipts) == len(debits) and len(receipts) > 0
    assert math.fsum(r.rho_debited for r in receipts) == pytest.approx(ledger.spent(), rel=1e-12)
    assert all(debits[r.ledger_seq].plan_id == r.plan_id for r in receipts)
    assert ledger.spent() <= g.guard.config.rho_limit and ledger.check() is None
    good(g, sign, dictionary)


# ----------------------------------------------------------------------------- tamper detection from the CLI
def test_site_audit_names_an_edited_entry_and_the_guard_refuses_to_start(guards, dictionary, sign, capsys):
    g = guards("va")
    for _ in range(2):
        good(g, sign, dictionary)
    refused(g.stub, sign(make_plan(dictionary, [(["nope"], 0.01)])))
    cfg = g.guard.config
    assert main(["site", "audit", "--config", cfg.source]) == 0
    assert "audit chain intact; debits match the audit log" in capsys.readouterr().out
    db = sqlite3.connect(cfg.ledger_path)
    db.execute("UPDATE audit SET code = 'OK' WHERE event = 'refused'")  # hide a refusal
    db.commit()
    seq = db.execute("SELECT seq FROM audit WHERE event = 'refused'").fetchone()[0]
    assert main(["site", "audit", "--config", cfg.source]) == 1
    assert f"AUDIT CHAIN BROKEN at entry #{seq}" in capsys.readouterr().err
    with pytest.raises(LedgerError, match=f"audit chain broken at entry #{seq}"):
        SiteGuard(cfg)
    # Undo the edit, then refund budget by deleting a debit: the chain still holds, the debits do not match it.
    db.execute("UPDATE audit SET code = 'UNKNOWN_VARIABLE' WHERE event = 'refused'")
    db.execute("DELETE FROM debits WHERE seq = (SELECT MAX(seq) FROM debits)")
    db.commit()
    db.close()
    assert main(["site", "audit", "--config", cfg.source]) == 1
    err = capsys.readouterr().err
    assert "LEDGER DAMAGED: audit entry" in err and "records a debit" in err and "the debits table lacks" in err
    assert main(["site", "serve", "--config", cfg.source]) == 2  # the guard will not run on a doctored ledger
    assert "will not answer plans" in capsys.readouterr().err


def _manifest_edit(change, resign_with=None):
    def do(path, k):
        m = json.loads((path / "manifest.json").read_text())
        change(m, k)
        (path / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
        if resign_with:
            key = keys.load_signing_key(resign_with(k))
            (path / "manifest.sig").write_text(keys.b64(key.sign((path / "manifest.json").read_bytes())) + "\n")
    return do


def _receipt_total_halved(m, k):
    r = m["receipts"][-1]
    rc = pb.BudgetReceipt.FromString(keys.unb64(r["receipt"]))
    rc.rho_spent_total /= 2  # the site "spent less" than its ledger says
    r["receipt"] = keys.b64(rc.SerializeToString())


def _site_key_swapped(m, k):
    """Forge a receipt with a key of one's own and put that key into the manifest."""
    priv, pub = keys.new_signing_key(k.root.parent / f"forger-{uuid.uuid4().hex[:6]}", "signing")
    site = m["receipts"][-1]["site"]
    forger = keys.load_signing_key(priv)
    for r in m["receipts"]:
        if r["site"] == site:
            r["signature"] = keys.b64(forger.sign(keys.unb64(r["receipt"])))
            r["signer"] = keys.fingerprint(forger.public_key())  # a complete re-keying: self-consistent
    m["keys"]["sites"][site] = pub.read_text()


@pytest.mark.parametrize("tamper, pinned, message", [
    (lambda p, k: (p / "aggregates.json").write_bytes((p / "aggregates.json").read_bytes().replace(b"1", b"2", 1)), False,
     "aggregates.json: SHA-256 does not match the manifest"),
    (_manifest_edit(lambda m, k: m["privacy"].update(delta=1e-9)), False, "signature of manifest.json does not verify"),
    (_manifest_edit(_receipt_total_halved, resign_with=lambda k: k.coordinator_key), False,
     "the receipt's signature does not verify"),
    (_manifest_edit(_site_key_swapped, resign_with=lambda k: k.coordinator_key), True,
     "the receipt's signature does not verify"),
])
def test_release_verify_command_detects_tampering(one_release, tmp_path, consortium_keys, capsys, tamper, pinned, message):
    import shutil

    copy = tmp_path / "rel"
    shutil.copytree(one_release, copy)
    pins = ["--coordinator-key", str(consortium_keys.coordinator_pub)] + [
        a for s in ("cleveland", "va") for a in ("--site-key", f"{s}={consortium_keys.site_keys[s][1]}")]
    assert main(["release", "verify", str(copy), *pins]) == 0
    assert "(pinned)" in capsys.readouterr().out
    tamper(copy, consortium_keys)
    if pinned:  # without pinned keys, the signed plans' addressees still name the site's own key
        assert main(["release", "verify", str(copy)]) == 2
        err = capsys.readouterr().err
        assert "the signed plan is not addressed to site 'va' with key" in err, err
    assert main(["release", "verify", str(copy), *(pins if pinned else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


# ----------------------------------------------------------------------------- keys
def test_keys_commands_write_private_keys_privately_and_never_print_them(tmp_path, capsys):
    out = tmp_path / "consortium"
    assert main(["keys", "init", "--out", str(out), "--sites", "a,b", "--hosts", "127.0.0.1,ehr.example.org"]) == 0
    printed = capsys.readouterr().out
    private = [p for p in out.rglob("*") if p.is_file() and p.suffix == ".key"]
    assert len(private) == 1 + 2 + 2 + 2  # CA, TLS server, coordinator, 2 sites, 2 SuperNodes
    for p in private:
        assert p.stat().st_mode & 0o777 == 0o600 and p.parent.stat().st_mode & 0o777 == 0o700
        body = "".join(p.read_text().splitlines()[1:-1])
        assert body[:40] not in printed and "PRIVATE" not in printed
    assert keys.fingerprint(keys.load_public_key(out / "sites/a/signing.pub")) in printed
    assert main(["keys", "fingerprint", str(out / "tls/server.pem"), str(out / "sites/a/signing.key")]) == 0
    printed = capsys.readouterr().out
    assert "hosts 127.0.0.1,ehr.example.org" in printed
    assert keys.fingerprint(keys.load_public_key(out / "sites/a/signing.pub")) in printed and "PRIVATE" not in printed
    assert main(["keys", "init", "--out", str(out), "--sites", "a"]) == 2  # never overwrites
    assert main(["keys", "signing", "--out", str(out / "sites/a")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    os.chmod(out / "sites/a/signing.key", 0o644)
    with pytest.raises(keys.KeyFileError, match="accessible by other users"):
        keys.load_signing_key(out / "sites/a/signing.key")
