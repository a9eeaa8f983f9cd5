"""`ppsehr simulate`: a release through Flower's Simulation Engine with in-process guards per virtual site."""

from __future__ import annotations

import json
import math

import pytest

from ppsehr.client import relay
from ppsehr.client.config import load_site_config
from ppsehr.client.ledger import Ledger


def test_only_a_simulation_environment_turns_on_in_process_guards(tmp_path, monkeypatch):
    index = tmp_path / "sites.json"
    index.write_text(json.dumps([str(tmp_path / "a.toml"), str(tmp_path / "b.toml")]))
    monkeypatch.delenv(relay.SIMULATION_SITES_ENV, raising=False)
    assert relay.simulation_site_config({"partition-id": 1, "num-partitions": 2}) is None  # a deployed SuperNode
    monkeypatch.setenv(relay.SIMULATION_SITES_ENV, str(index))
    assert relay.simulation_site_config({"partition-id": 1, "num-partitions": 2}) == str(tmp_path / "b.toml")
    assert relay.simulation_site_config({"guard-address": "127.0.0.1:1", "partition-id": 1}) is None
    assert relay.simulation_site_config({"site": "x"}) is None


def test_in_process_relay_keeps_the_relay_error_vocabulary(tmp_path):
    assert relay.relay_in_process(b"\x01not a plan", str(tmp_path / "x.toml")).get("error_code") == "MALFORMED_PLAN"
    from ppsehr.protos import guard_pb2 as pb

    record = relay.relay_in_process(pb.SignedPlan(plan=b"x").SerializeToString(), str(tmp_path / "missing.toml"))
    assert record.get("error_code") == "GUARD_UNAVAILABLE" and "missing" not in record.get("error")


@pytest.mark.deployment
def test_five_virtual_sites_release_through_flowers_simulation(tmp_path):
    pytest.importorskip("ray")
    from ppsehr.deploy.simulate import simulate

    figures = simulate(5, 3000, 6, 2.0, tmp_path / "work", tmp_path / "release", seed=3, workers=2,
                       say=lambda m: None, site_variable="model", formats=["csv"], report=False)
    # verify_release ran inside simulate(); every virtual site answered through its own guard and ledger
    assert figures["sites_answered"] == 5 and figures["sites_not_included"] == 0
    manifest = json.loads((tmp_path / "release" / "manifest.json").read_text())
    for site, entry in manifest["sites"].items():
        cfg = load_site_config(tmp_path / "work" / "consortium" / "sites" / f"{site}.toml")
        assert Ledger(cfg.ledger_path, cfg.rho_limit, site).spent() == pytest.approx(entry["rho_total"], rel=1e-12)
    assert math.isfinite(figures["tvd2"]) and 0 <= figures["tvd2"] < 0.5
    assert figures["wall_s"] > 0 and figures["peak_rss_bytes_flower"] > 0
