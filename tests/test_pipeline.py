"""The coordinator pipeline in-process (real gRPC guards, DirectTransport, no Flower)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ppsehr.common import accounting
from ppsehr.common.errors import PpsehrError
from ppsehr.server.pipeline import Events, ReleaseJob, run_release
from ppsehr.server.release.bundle import verify_release
from ppsehr.deploy.transports import DirectTransport

from conftest import edit_manifest, resign_manifest


@pytest.fixture
def job(consortium_keys, demo):
    def make(out, **kw):
        return ReleaseJob.create(dictionary=str(demo / "dictionary.toml"), out=str(out),
                          signing_key=str(consortium_keys.coordinator_key),
                          site_keys={s: str(p[1]) for s, p in consortium_keys.site_keys.items()}, **kw)

    return make


def test_release_from_four_sites(guards, job, dictionary, tmp_path, all_sites):
    gs = guards(*all_sites)
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    seen = []
    manifest = run_release(job(tmp_path / "rel", epsilon=4.0, seed=7), transport, Events(echo=seen.append))
    out = tmp_path / "rel"
    assert verify_release(out)["release_id"] == manifest["release_id"]
    assert any("4 site(s) answered" in m for m in seen)
    # The manifest's per-site spending is exactly what each site's ledger holds.
    for g in gs:
        s = manifest["sites"][g.guard.config.site]
        assert s["rho_total"] == pytest.approx(g.guard.ledger.spent(), rel=1e-12)
        assert s["rho"] <= accounting.rho_for_epsilon(4.0, 1e-6) * (1 + 1e-9)
        assert s["epsilon"] == pytest.approx(accounting.epsilon(s["rho"], 1e-6))
    assert {r["site"] for r in manifest["receipts"]} == set(all_sites)
    # Records: the dictionary's columns and vocabulary, as many rows as the DP total estimate.
    with open(out / "records.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == dictionary.names
    assert len(rows) == manifest["generator"]["rows"]
    assert abs(len(rows) - 920) < 150
    for name, var in dictionary.variables.items():
        if var.type == "categorical":
            assert {r[name] for r in rows} <= set(var.categories) | {""}
    fidelity = json.loads((out / "fidelity.json").read_text())
    assert set(fidelity["mean_tvd_by_width"]) == {"1", "2"}


def test_model_keeps_dependencies_a_product_of_marginals_would_lose(guards, job, demo, dictionary, tmp_path, all_sites):
    """At a generous budget, the records keep the strong heart_disease ~ cp association of the real data."""
    from ppsehr.common.mapping import load_mapping
    from ppsehr.common.source import load_site_table

    gs = guards(*all_sites, epsilon=100.0, policy={"max_rho_per_plan": 50.0})
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    run_release(job(tmp_path / "rel", epsilon=40.0, seed=1, rows=20000), transport, Events())
    with open(tmp_path / "rel" / "records.csv") as f:
        rows = list(csv.DictReader(f))

    def p_present_given(rows_cp, cp):
        sel = [hd for c, hd in rows_cp if c == cp]
        return np.mean([hd == "present" for hd in sel])

    synth = [(r["cp"], r["heart_disease"]) for r in rows]
    real = []
    for site in all_sites:
        t, _ = load_site_table(load_mapping(demo / "sites" / f"{site}.toml", dictionary), dictionary)
        cps, hds = dictionary["cp"].cells, dictionary["heart_disease"].cells
        real += [(cps[a], hds[b]) for a, b in zip(t.columns["cp"], t.columns["heart_disease"])]
    for cp in ("asymptomatic", "atypical_angina"):
        assert p_present_given(synth, cp) == pytest.approx(p_present_given(real, cp), abs=0.08)
    assert p_present_given(synth, "asymptomatic") - p_present_given(synth, "atypical_angina") > 0.4


def test_second_release_spends_more_and_over_budget_is_refused_without_debit(guards, job, tmp_path, all_sites):
    gs = guards(*all_sites[:2], epsilon=3.0)
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    m1 = run_release(job(tmp_path / "r1", epsilon=1.0, seed=1), transport, Events())
    m2 = run_release(job(tmp_path / "r2", epsilon=1.0, seed=2), transport, Events())
    for g in gs:
        site = g.guard.config.site
        assert m2["sites"][site]["rho_total"] == pytest.approx(2 * m1["sites"][site]["rho_total"])
        assert m2["sites"][site]["epsilon_total"] > m1["sites"][site]["epsilon_total"]
    spent = {g.guard.config.site: g.guard.ledger.spent() for g in gs}
    with pytest.raises(PpsehrError, match="no site answered the round-1 plan.*OVER_BUDGET"):
        run_release(job(tmp_path / "r3", epsilon=8.0), transport, Events())  # round 1 alone is more than is left
    assert not (tmp_path / "r3").exists()
    assert {g.guard.config.site: g.guard.ledger.spent() for g in gs} == spent


def test_a_site_that_is_down_is_reported_not_charged(guards, job, tmp_path, all_sites):
    gs = guards(*all_sites[:3])
    down = gs[2]
    down.stop()
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    m = run_release(job(tmp_path / "rel", epsilon=4.0, seed=3), transport, Events())
    assert set(m["sites"]) == {g.guard.config.site for g in gs[:2]}
    failures = m["sites_not_included"]
    assert [f["round"] for f in failures] == [1, 2, 3]  # 1-ways, candidates, selected tables
    # it gave no signed identity before the first paid plan: sent nothing paid, so certainly not charged
    assert all(f["code"] == "NOT_VERIFIED" and f["site"] == down.guard.config.site and "GUARD_UNAVAILABLE" in f["message"]
               and f["charged"] == "no (the plan was not sent to it to be answered)" for f in failures)
    assert down.guard.ledger.spent() == 0.0


def _flip_receipt(m):
    from ppsehr.common import keys
    from ppsehr.protos import guard_pb2 as pb

    r = m["receipts"][0]
    rc = pb.BudgetReceipt.FromString(keys.unb64(r["receipt"]))
    rc.rho_debited /= 10
    r["receipt"] = keys.b64(rc.SerializeToString())


@pytest.mark.parametrize("tamper, message", [
    (lambda p, k: (p / "records.csv").write_text("age\n1\n"), "SHA-256 does not match"),
    (lambda p, k: (p / "extra.csv").write_text("x"), "not covered by the manifest"),
    (lambda p, k: (p / "fidelity.json").unlink(), "missing"),
    (lambda p, k: edit_manifest(p, lambda m: m["sites"]["va"].update(epsilon=0.01)), "signature of manifest.json does not verify"),
    (lambda p, k: (edit_manifest(p, lambda m: m["sites"]["va"].update(epsilon=0.01)), resign_manifest(p, k.coordinator_key)),
     "does not follow from rho"),
    (lambda p, k: (edit_manifest(p, lambda m: m["sites"]["va"].update(rho=0.0001)), resign_manifest(p, k.coordinator_key)),
     "does not match its signed receipt"),
    (lambda p, k: (edit_manifest(p, _flip_receipt), resign_manifest(p, k.coordinator_key)), "receipt's signature does not verify"),
    (lambda p, k: (p / "manifest.sig").unlink(), "not signed"),
    (lambda p, k: (edit_manifest(p, lambda m: m["privacy"].update(release_rho_max=1e-9)), resign_manifest(p, k.coordinator_key)),
     "release_rho_max"),
    (lambda p, k: (edit_manifest(p, lambda m: m["plans"][0]["marginals"][0].update(rho=1e-9)), resign_manifest(p, k.coordinator_key)),
     "other marginals or rho than the signed plan"),
    (lambda p, k: (edit_manifest(p, lambda m: m.update(receipts=[r for r in m["receipts"] if r["site"] != "va"])),
                   resign_manifest(p, k.coordinator_key)), "has no receipt"),
    (lambda p, k: (edit_manifest(p, lambda m: m.update(sites={}, receipts=[])), resign_manifest(p, k.coordinator_key)),
     "no site contributed"),
])
def test_verify_detects_tampering(one_release, tmp_path, consortium_keys, tamper, message):
    import shutil

    from ppsehr.common.errors import ReleaseError

    copy = tmp_path / "rel"
    shutil.copytree(one_release, copy)
    verify_release(copy)
    tamper(copy, consortium_keys)
    with pytest.raises(ReleaseError, match=message):
        verify_release(copy)


def test_verify_with_pinned_keys_rejects_a_substituted_coordinator(one_release, tmp_path, consortium_keys):
    import shutil

    from ppsehr.common import keys
    from ppsehr.common.errors import ReleaseError

    copy = tmp_path / "rel"
    shutil.copytree(one_release, copy)
    verify_release(copy, coordinator_key=consortium_keys.coordinator_pub,
                   site_keys={s: p[1] for s, p in consortium_keys.site_keys.items()})
    # someone re-signs the release with their own key and swaps it into the manifest
    priv, pub = keys.new_signing_key(tmp_path, "mallory")
    edit_manifest(copy, lambda m: m["keys"].update(coordinator=pub.read_text()))
    resign_manifest(copy, priv)
    with pytest.raises(ReleaseError, match="does not verify"):
        verify_release(copy, coordinator_key=consortium_keys.coordinator_pub)


def test_the_default_release_selects_in_three_rounds_with_a_receipt_each(guards, job, tmp_path, all_sites, dictionary):
    """Round 1 the 1-way tables per site, round 2 every pair as a cheap candidate, round 3 the 1-way tables
    again and the selected pairs; the manifest accounts for all three plans."""
    gs = guards(*all_sites[:3])
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    seen = []
    m = run_release(job(tmp_path / "rel", epsilon=4.0, seed=5, site_variable="release"),
                    transport, Events(echo=seen.append))
    verify_release(tmp_path / "rel")
    assert [p["round"] for p in m["plans"]] == [1, 2, 3]
    assert any("secure aggregation is not possible" in s for s in seen)  # no site allows it: plain sums, no cost
    third = [tuple(x["variables"]) for x in m["plans"][2]["marginals"]]
    assert third[:len(dictionary.names)] == [(n,) for n in dictionary.names]  # the 1-way tables again
    pairs = len(third) - len(dictionary.names)  # at most a spanning tree, and at most one extra pair per two variables
    assert len(dictionary.names) // 2 <= pairs <= len(dictionary.names) - 1 + len(dictionary.names) // 2
    assert sum(p["rho_per_site"] for p in m["plans"]) == pytest.approx(accounting.rho_for_epsilon(4.0, 1e-6))
    for g in gs:
        site = g.guard.config.site
        assert m["sites"][site]["plans"] == 3
        assert m["sites"][site]["rho"] == pytest.approx(g.guard.ledger.spent(), rel=1e-12)
        assert len([r for r in m["receipts"] if r["site"] == site]) == 3
    with open(tmp_path / "rel" / "records.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[0] == "site" and {r["site"] for r in rows} <= {g.guard.config.site for g in gs}
    assert m["generator"]["site_variable"] == "release"


def test_pooled_release_has_no_site_axis(guards, job, dictionary, tmp_path, all_sites):
    gs = guards(*all_sites[:2])
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    m = run_release(job(tmp_path / "rel", epsilon=2.0, seed=6, site_variable="pooled", outcome="heart_disease"),
                    transport, Events())
    assert m["generator"]["outcome"] == "heart_disease"  # a declared outcome: every pair with it in round 3
    star = {v for x in m["plans"][-1]["marginals"] if "heart_disease" in x["variables"] for v in x["variables"]}
    assert star == set(dictionary.names)
    aggregates = json.loads((tmp_path / "rel" / "aggregates.json").read_text())
    assert all("site" not in a["variables"] for a in aggregates["marginals"])
    assert all("site" not in c for c in m["generator"]["cliques"])
    spent = {g.guard.config.site: g.guard.ledger.spent() for g in gs}
    for bad, message in ((dict(site_variable="both"), "site_variable must be one of"),
                         (dict(strategy="adaptive"), "unknown release option"), (dict(epsilon=-1.0), "budget"),
                         (dict(secure_aggregation="yes"), "secure_aggregation")):
        with pytest.raises(PpsehrError, match=message):
            run_release(job(tmp_path / "bad", **({"epsilon": 0.1} | bad)), transport, Events())
        assert not (tmp_path / "bad").exists()
    assert {g.guard.config.site: g.guard.ledger.spent() for g in gs} == spent  # a bad job costs nothing


def test_release_with_an_llm_endpoint_gains_notes_rules_and_an_llm_section(guards, job, tmp_path, all_sites):
    """The whole release path with a local OpenAI-compatible server: notes listed and hashed, usage recorded."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from fake_openai_server import FakeOpenAI

    gs = guards(*all_sites[:2])
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    server = FakeOpenAI().start()
    try:
        llm = {"base_url": server.base_url, "model": "fake-model", "timeout": 2.0, "cache_dir": "",
               "uses": ["knowledge", "notes"]}
        m = run_release(job(tmp_path / "rel", epsilon=2.0, seed=4, rows=40, llm=llm, formats=["csv"], report=False),
                        transport, Events())
    finally:
        server.stop()
    manifest = verify_release(tmp_path / "rel")
    assert manifest["llm"]["used"] is True and manifest["llm"]["model"] == "fake-model"
    assert manifest["llm"]["calls"] > 0 and manifest["llm"]["prompt_tokens"] > 0
    assert "notes.jsonl" in manifest["files"]
    notes = (tmp_path / "rel" / "notes.jsonl").read_text().splitlines()
    assert len(notes) == 40
    assert not (tmp_path / "rel" / "records.parquet").exists()  # formats narrowed to csv
    assert m["generator"]["formats"] == ["csv"]


def test_jobs_the_coordinator_cannot_finish_are_refused_before_anything_is_sent(guards, job, tmp_path, all_sites, dictionary):
    gs = guards(*all_sites[:2])
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    for bad, message in ((dict(structure=[["age", "shoe_size"]]), "prior dependencies .* Nothing was sent"),
                         (dict(structure=[["age"]]), "2 or 3 variable names"),
                         (dict(seed=-1), "seed must be a non-negative integer"),
                         (dict(site_groups={"va": ""}), "site_groups")):
        with pytest.raises(PpsehrError, match=message):
            run_release(job(tmp_path / "bad", epsilon=1.0, **bad), transport, Events())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(PpsehrError, match="already exists"):
        run_release(job(tmp_path / "taken", epsilon=1.0), transport, Events())
    assert all(g.guard.ledger.spent() == 0.0 for g in gs)


def test_a_release_survives_later_rounds_nobody_answers(guards, job, tmp_path, all_sites):
    """Sites allow one plan a day: rounds 2 and 3 are refused everywhere (at no cost), so the release
    uses round 1's tables."""
    gs = guards(*all_sites[:2], policy={"max_plans_per_day": 1})
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    m = run_release(job(tmp_path / "rel", epsilon=4.0, seed=8), transport, Events())
    verify_release(tmp_path / "rel")
    assert [p["round"] for p in m["plans"]] == [1, 2, 3]
    assert {f["code"] for f in m["sites_not_included"] if f["round"] > 1} == {"RATE_LIMITED"}
    for g in gs:
        assert m["sites"][g.guard.config.site]["plans"] == 1
        assert m["sites"][g.guard.config.site]["rho"] == pytest.approx(g.guard.ledger.spent(), rel=1e-12)
    assert all(len(c) <= 3 for c in m["generator"]["cliques"])  # the prior structure (+ site), not all candidates
