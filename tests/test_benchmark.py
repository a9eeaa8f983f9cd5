"""`ppsehr bench fidelity`: its metrics on known cases and its outputs (ppsehr and the light baselines)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ppsehr.deploy.cli import main
from ppsehr.deploy.bench import fidelity as B


def test_auc_on_known_cases():
    y = np.array([0, 0, 1, 1])
    assert B.auc(np.array([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert B.auc(np.array([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    assert B.auc(np.array([0.5, 0.5, 0.5, 0.5]), y) == 0.5
    assert B.auc(np.array([0.1, 0.6, 0.4, 0.9]), y) == 0.75


def test_tvd_is_zero_for_identical_data_and_one_for_disjoint():
    a = np.array([[0, 0], [1, 1], [1, 0]])
    assert B.tvds(a, a, [2, 2], 2) == 0.0
    assert B.tvds(np.zeros((5, 1), int), np.ones((5, 1), int), [2], 1) == 1.0


def test_logistic_regression_learns_a_clear_signal():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, size=(2000, 2))
    target = np.where(rng.random(2000) < 0.9, (x[:, 0] == 2).astype(int), rng.integers(0, 2, 2000))
    data = np.column_stack([target, x])
    assert B.tstr(data[:1500], data[1500:], [2, 3, 3], 0) > 0.85


def test_the_table_shows_the_spread_over_seeds_of_tvd2_and_of_its_ratio():
    def row(method, seed, tvd2):
        return {"dataset": "d", "method": method, "epsilon": 1.0, "seed": seed, "tvd1": 0.0, "tvd2": tvd2, "tvd3": 0.0,
                "tstr_auc": 0.5, "trtr_auc": 0.5, "fit_seconds": 0.0}

    rows = [row("ppsehr", 0, 0.10), row("ppsehr", 1, 0.12), row("central-mst", 0, 0.10), row("central-mst", 1, 0.10)]
    summary = {r["method"]: r for r in B.summarize(rows)}
    assert summary["ppsehr"]["tvd2_se"] == pytest.approx(0.01) and summary["central-mst"]["tvd2_se"] == 0.0
    table = B.markdown(list(summary.values()), "cmd")
    assert "0.1100 ±0.0100" in table and "| 1.100 ±0.100 |" in table  # the ratio's error: 1.1 * 0.01 / 0.11
    one = B.markdown(B.summarize(rows[:1] + rows[2:3]), "cmd")
    assert "±" not in one and "| 1.000 |" in one  # one seed: no spread to show


def test_bench_fidelity_command_writes_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "fidelity", "--epsilon", "4", "--seeds", "1", "--methods", "ppsehr,ppsehr-plain,independent,bootstrap",
                 "--json", str(out / "f.json"), "--out", str(out)]) == 0
    doc = json.loads((out / "f.json").read_text())
    assert {r["method"] for r in doc["rows"]} == {"ppsehr", "ppsehr-plain", "independent", "bootstrap"}
    for r in doc["rows"]:
        assert set(r) >= {"dataset", "method", "epsilon", "seed", "tvd1", "tvd2", "tvd3", "tstr_auc", "trtr_auc", "fit_seconds"}
    by = {r["method"]: r for r in doc["rows"]}
    assert by["bootstrap"]["tvd2"] < by["ppsehr"]["tvd2"]  # the non-private floor
    assert by["ppsehr"]["tstr_auc"] > by["independent"]["tstr_auc"]  # a model keeps what independent columns lose
    assert by["ppsehr-plain"]["tvd2"] < by["independent"]["tvd2"]  # the plain-sum path runs and fits a real model
    assert (out / "f.md").read_text().count("| demo |") == 4
    assert (out / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_unknown_methods():
    with pytest.raises(SystemExit, match="unknown method"):
        main(["bench", "fidelity", "--methods", "magic"])


def test_central_baselines_without_the_bench_extra_stop_before_any_work(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mbi", None)  # as if the bench extra were not installed
    with pytest.raises(SystemExit, match=r"central-mst need\(s\) the bench extra"):
        main(["bench", "fidelity", "--methods", "ppsehr,central-mst"])


def test_bench_speed_model_part_runs_a_release_and_times_the_fit(tmp_path):
    assert main(["bench", "speed", "--parts", "model", "--model-attributes", "5", "--model-rows", "1e4", "--repeat", "1",
                 "--json", str(tmp_path / "s.json"), "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "s.json").read_text())["model"]
    assert row["attributes"] == 5 and row["fit_s"] > 0
