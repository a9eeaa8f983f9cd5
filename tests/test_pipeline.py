"""The coordinator pipeline in-process (real gRPC guards, DirectTransport, no Flower)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ppsehr.common import accounting
from ppsehr.common.errors import PpsehrError
from ppsehr.server.pipeline import Events, ReleaseJob, run_release
from ppsehr.server.release import verify_release
from ppsehr.server.transport import DirectTransport


def job(demo, out, **kw):
    return ReleaseJob(dictionary=str(demo / "dictionary.toml"), out=str(out), **kw)


def test_release_from_four_sites(guards, demo, dictionary, tmp_path, all_sites):
    gs = guards(*all_sites)
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    seen = []
    manifest = run_release(job(demo, tmp_path / "rel", epsilon=4.0, seed=7), transport, Events(echo=seen.append))
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


def test_model_keeps_dependencies_a_product_of_marginals_would_lose(guards, demo, dictionary, tmp_path, all_sites):
    """At a generous budget, the records keep the strong heart_disease ~ cp association of the real data."""
    from ppsehr.common.mapping import load_mapping, load_site_table

    gs = guards(*all_sites, epsilon=100.0)
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    run_release(job(demo, tmp_path / "rel", epsilon=40.0, seed=1, rows=20000), transport, Events())
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


def test_second_release_spends_more_and_over_budget_is_refused_without_debit(guards, demo, tmp_path, all_sites):
    gs = guards(*all_sites[:2], epsilon=3.0)
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    m1 = run_release(job(demo, tmp_path / "r1", epsilon=1.0, seed=1), transport, Events())
    m2 = run_release(job(demo, tmp_path / "r2", epsilon=1.0, seed=2), transport, Events())
    for g in gs:
        site = g.guard.config.site
        assert m2["sites"][site]["rho_total"] == pytest.approx(2 * m1["sites"][site]["rho_total"])
        assert m2["sites"][site]["epsilon_total"] > m1["sites"][site]["epsilon_total"]
    spent = {g.guard.config.site: g.guard.ledger.spent() for g in gs}
    with pytest.raises(PpsehrError, match="no site answered the plan.*OVER_BUDGET"):
        run_release(job(demo, tmp_path / "r3", epsilon=3.0), transport, Events())
    assert not (tmp_path / "r3").exists()
    assert {g.guard.config.site: g.guard.ledger.spent() for g in gs} == spent


def test_a_site_that_is_down_is_reported_not_charged(guards, demo, tmp_path, all_sites):
    gs = guards(*all_sites[:3])
    down = gs[2]
    down.stop()
    transport = DirectTransport({g.guard.config.site: g.address for g in gs})
    m = run_release(job(demo, tmp_path / "rel", epsilon=2.0, seed=3), transport, Events())
    assert set(m["sites"]) == {g.guard.config.site for g in gs[:2]}
    [failure] = m["sites_not_included"]
    assert failure["code"] == "GUARD_UNAVAILABLE" and failure["site"] == down.guard.config.site
    assert down.guard.ledger.spent() == 0.0
