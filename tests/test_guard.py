"""The site guard over real gRPC: what leaves, what is refused, what is debited."""

from __future__ import annotations

import math
import threading
import time

import grpc
import numpy as np
import pytest

from ppsehr.client.guard import SiteGuard
from ppsehr.client.ledger import Ledger
from ppsehr.common import accounting
from ppsehr.common.mapping import load_mapping
from ppsehr.common.source import load_site_table
from ppsehr.protos import guard_pb2 as pb
from ppsehr.server.measure import planner


def plan_for(dictionary, marginals, plan_id=None, dictionary_hash=None):
    return pb.QueryPlan(plan_id=plan_id or f"p-{np.random.randint(1 << 62)}", coordinator="tester", purpose="test",
                        dictionary_hash=dictionary.hash if dictionary_hash is None else dictionary_hash,
                        marginals=[pb.MarginalQuery(variables=v, rho=r) for v, r in marginals])


@pytest.fixture
def ask(sign):
    """Send a plan (signed by the allowlisted coordinator unless already signed); return the parsed Summary."""

    def do(g, plan):
        signed = plan if isinstance(plan, pb.SignedPlan) else sign(plan)
        return pb.Summary.FromString(g.stub.Answer(signed).summary)

    return do


@pytest.fixture
def refusal(sign):
    def do(stub, plan):
        signed = plan if isinstance(plan, pb.SignedPlan) else sign(plan)
        with pytest.raises(grpc.RpcError) as e:
            stub.Answer(signed)
        return e.value.code(), e.value.details()

    return do


def test_summary_holds_only_noisy_tables_of_the_declared_shape(guards, dictionary, demo, ask):
    g = guards("cleveland")
    plan = planner.to_proto(planner.one_round_plan(dictionary, 0.5), dictionary, "tester", "shape test")
    s = ask(g, plan)
    # Only these fields exist on the wire: no row count, no raw value, nothing else.
    assert {f.name for f, _ in s.ListFields()} == {"site", "plan_id", "dictionary_hash", "marginals", "receipt",
                                                  "receipt_signature"}
    table, _ = load_site_table(load_mapping(demo / "sites" / "cleveland.toml", dictionary), dictionary)
    exact_sums, noisy_sums = [], []
    for got, want in zip(s.marginals, plan.marginals):
        shape = tuple(dictionary[v].size for v in want.variables)
        assert tuple(got.variables) == tuple(want.variables) and tuple(got.shape) == shape
        assert len(got.counts) == math.prod(shape)  # every public cell, empty or not
        assert {f.name for f, _ in got.ListFields()} <= {"variables", "shape", "counts", "rho", "noise_scale"}
        assert got.rho <= want.rho * (1 + 1e-9)
        assert got.noise_scale == pytest.approx(math.sqrt(1 / (2 * want.rho)), rel=1e-6)
        exact = np.bincount(table.cell_index(want.variables, shape), minlength=math.prod(shape))
        exact_sums.append(exact.sum())
        noisy_sums.append(sum(got.counts))
        # noise: a table is never returned exact (probability ~ 0 at sigma ~ 7 with >= 2 cells)
        assert not np.array_equal(np.asarray(got.counts), exact)
    assert len(set(noisy_sums)) > 1, "row totals must be noised, not shared exactly across tables"
    receipt = pb.BudgetReceipt.FromString(s.receipt)
    assert receipt.rho_debited == pytest.approx(sum(m.rho for m in s.marginals))
    assert receipt.rho_spent_total == pytest.approx(g.guard.ledger.spent())


def test_debit_is_opendp_privacy_loss(guards, dictionary, ask):
    g = guards("hungarian")
    s = ask(g, plan_for(dictionary, [(["age"], 0.01), (["sex", "cp"], 0.02)]))
    receipt = pb.BudgetReceipt.FromString(s.receipt)
    assert receipt.rho_debited == pytest.approx(accounting.rho_of_scales([m.noise_scale for m in s.marginals]), rel=1e-9)
    assert receipt.rho_debited <= 0.03 * (1 + 1e-9)


@pytest.mark.parametrize("marginals, code, status", [
    ([(["no_such_var"], 0.01)], "UNKNOWN_VARIABLE", grpc.StatusCode.INVALID_ARGUMENT),
    ([(["age"], -0.1)], "BAD_RHO", grpc.StatusCode.INVALID_ARGUMENT),
    ([(["age"], float("nan"))], "BAD_RHO", grpc.StatusCode.INVALID_ARGUMENT),
    ([(["age"], float("inf"))], "BAD_RHO", grpc.StatusCode.INVALID_ARGUMENT),
    ([(["age"], 0.0)], "BAD_RHO", grpc.StatusCode.INVALID_ARGUMENT),
    ([(["age"], 1e9)], "POLICY_LIMIT", grpc.StatusCode.PERMISSION_DENIED),
    ([(["age", "sex", "cp", "chol"], 0.01)], "POLICY_LIMIT", grpc.StatusCode.PERMISSION_DENIED),
    ([(["age", "age"], 0.01)], "MALFORMED_PLAN", grpc.StatusCode.INVALID_ARGUMENT),
    ([], "MALFORMED_PLAN", grpc.StatusCode.INVALID_ARGUMENT),
    ([(["age"], 1e-4)] * 501, "POLICY_LIMIT", grpc.StatusCode.PERMISSION_DENIED),
])
def test_bad_plans_are_refused_without_debit(guards, dictionary, marginals, code, status, ask, refusal):
    g = guards("va")
    plan = plan_for(dictionary, marginals)
    got_status, details = refusal(g.stub, plan)
    assert got_status == status and details.startswith(code + ":")
    assert g.guard.ledger.spent() == 0.0 and g.guard.ledger.debits() == []
    last = g.guard.ledger.audit_entries()[-1]
    assert (last.event, last.code, last.plan_id) == ("refused", code, plan.plan_id)
    ask(g, plan_for(dictionary, [(["age"], 0.01)]))  # and the guard still answers a good plan


def test_other_dictionary_and_replayed_plan_are_refused(guards, dictionary, sign, ask, refusal):
    g = guards("switzerland")
    status, details = refusal(g.stub, plan_for(dictionary, [(["age"], 0.01)], dictionary_hash="sha256:" + "0" * 64))
    assert status == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("DICTIONARY_MISMATCH")
    signed = sign(plan_for(dictionary, [(["age"], 0.01)]))
    ask(g, signed)
    spent = g.guard.ledger.spent()
    status, details = refusal(g.stub, signed)
    assert status == grpc.StatusCode.ALREADY_EXISTS and details.startswith("REPLAYED_PLAN")
    assert g.guard.ledger.spent() == spent


def test_unsigned_forged_and_expired_plans_are_refused(guards, dictionary, sign, refusal, tmp_path):
    from ppsehr.common.keys import load_signing_key, new_signing_key

    g = guards("cleveland")
    plan = plan_for(dictionary, [(["age"], 0.01)])
    stranger = load_signing_key(new_signing_key(tmp_path, "stranger")[0])
    cases = {
        "UNTRUSTED_SIGNER": sign(plan_for(dictionary, [(["age"], 0.01)]), key=stranger),
        "BAD_SIGNATURE": pb.SignedPlan(plan=sign(plan).plan.replace(b"age", b"sex"), signature=sign(plan).signature,
                                       signer=sign(plan).signer),
        "PLAN_EXPIRED": sign(pb.QueryPlan(plan_id="old", dictionary_hash=dictionary.hash, expires_at=int(time.time()) - 1,
                                          marginals=[pb.MarginalQuery(variables=["age"], rho=0.01)])),
    }
    unsigned = pb.SignedPlan(plan=plan.SerializeToString())
    status, details = refusal(g.stub, unsigned)
    assert details.startswith("UNTRUSTED_SIGNER")
    for code, signed in cases.items():
        status, details = refusal(g.stub, signed)
        assert details.startswith(code + ":"), (code, details)
    far = plan_for(dictionary, [(["age"], 0.01)])
    far.expires_at = int(time.time() + 10 * 86400)
    assert refusal(g.stub, sign(far))[1].startswith("PLAN_EXPIRED")
    assert g.guard.ledger.spent() == 0.0
    assert [e.code for e in g.guard.ledger.audit_entries()] == ["UNTRUSTED_SIGNER", "UNTRUSTED_SIGNER", "BAD_SIGNATURE",
                                                                 "PLAN_EXPIRED", "PLAN_EXPIRED"]


def test_too_many_cells_is_refused(guards, dictionary, refusal):
    g = guards("cleveland", policy={"max_cells": 50})
    status, details = refusal(g.stub, plan_for(dictionary, [(["age", "chol"], 0.01)]))  # 9 x 11 = 99 cells
    assert details.startswith("POLICY_LIMIT") and "99 cells" in details
    assert g.guard.ledger.spent() == 0.0


def test_lifetime_budget_is_enforced_and_durable(site_config, dictionary, guards, ask, refusal):
    cfg = site_config("cleveland", epsilon=1.0)  # rho ~ 0.0244
    g = guards("cleveland", epsilon=1.0)
    ask(g, plan_for(dictionary, [(["age"], 0.02)]))
    status, details = refusal(g.stub, plan_for(dictionary, [(["age"], 0.01)]))
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("OVER_BUDGET")
    assert g.guard.ledger.spent() == pytest.approx(0.02)
    # A new guard process on the same state sees the same ledger and budget.
    again = SiteGuard(cfg)
    assert again.ledger.spent() == pytest.approx(0.02)
    assert again.ledger.verify_audit() is None
    assert [e.event for e in again.ledger.audit_entries()] == ["debit", "answered", "refused"]


def test_a_plan_whose_release_cannot_be_completed_is_refused_for_free(dictionary, guards, ask, refusal):
    g = guards("cleveland", epsilon=1.0)  # rho ~ 0.0244
    first = plan_for(dictionary, [(["age"], 0.01)])
    first.rho_to_follow = 0.02  # the release's later rounds: 0.03 in all, more than is left
    status, details = refusal(g.stub, first)
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("OVER_BUDGET")
    assert "later rounds" in details and g.guard.ledger.spent() == 0.0
    fits = plan_for(dictionary, [(["age"], 0.01)])
    fits.rho_to_follow = 0.01
    ask(g, fits)
    assert g.guard.ledger.spent() == pytest.approx(0.01)
    hostile = plan_for(dictionary, [(["age"], 0.001)])
    hostile.rho_to_follow = float("nan")
    assert refusal(g.stub, hostile)[1].startswith("MALFORMED_PLAN") and g.guard.ledger.spent() == pytest.approx(0.01)


def test_racing_coordinators_never_overspend(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite", rho_limit=1.0, site="s")
    ok, refused = [], []

    def worker(i):
        other = Ledger(tmp_path / "l.sqlite", rho_limit=1.0, site="s")  # separate connections, like separate guards
        try:
            other.debit(f"plan-{i}", f"coord-{i % 2}", b"x", 0.3, {})
            ok.append(i)
        except Exception as e:
            refused.append(type(e).__name__)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == 3 and refused == ["BudgetExceeded"] * 9
    assert ledger.spent() == pytest.approx(0.9) and ledger.spent() <= 1.0
    assert ledger.verify_audit() is None


def test_audit_chain_detects_edits(tmp_path):
    import sqlite3

    ledger = Ledger(tmp_path / "l.sqlite", rho_limit=1.0, site="s")
    ledger.debit("p1", "c", b"x", 0.1, {})
    ledger.audit("refused", "p2", "c", "BAD_RHO", {"reason": "x"})
    ledger.audit("answered", "p1", "c", "OK", {})
    assert ledger.verify_audit() is None
    db = sqlite3.connect(tmp_path / "l.sqlite")
    db.execute("UPDATE audit SET detail = '{\"reason\":\"y\"}' WHERE seq = 2")
    db.commit()
    db.close()
    assert ledger.verify_audit() == 2


def test_status_reports_budget(guards, dictionary, ask):
    g = guards("va")
    ask(g, plan_for(dictionary, [(["sex"], 0.05)]))
    d = g.stub.Describe(pb.DescribeRequest())
    assert d.site == "va" and d.dictionary_hash == dictionary.hash
    assert d.rho_spent == pytest.approx(0.05) and d.rho_limit == pytest.approx(accounting.rho_for_epsilon(10.0, 1e-6))
