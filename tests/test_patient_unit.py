"""The patient is the privacy unit: multi-row patients are refused, reduced, or bounded to k rows and charged k^2;
receipts, manifest and report say which."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from conftest import RunningGuard
from ppsehr.client.config import load_site_config
from ppsehr.client.doctor import FAIL, diagnose
from ppsehr.client.guard import SiteGuard
from ppsehr.client.ledger import Ledger
from ppsehr.common import accounting, privacy_unit
from ppsehr.common.errors import MappingError
from ppsehr.common.mapping import load_mapping
from ppsehr.common.source import load_site_table
from ppsehr.deploy.cli import main
from ppsehr.deploy.local import write_site_config
from ppsehr.protos import guard_pb2 as pb
from ppsehr.server.measure.aggregate import SiteResult
from ppsehr.server.release import manifest as mf

COLUMNS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak", "slope", "ca", "thal",
           "num"]
REPEATED = 10  # the first 30 rows of Cleveland become 10 patients with 3 visits each


def pid(i: int) -> str:
    return f"PX-{i // 3:04d}" if i < 3 * REPEATED else f"PX-{i:04d}"


@pytest.fixture
def ehr(tmp_path, demo, dictionary):
    """Cleveland's rows with patient ids and visit dates: 10 patients have 3 rows (visits on Jan 1, 2, 3)."""
    rows = (demo / "data" / "processed.cleveland.data").read_text().splitlines()
    lines = ["pid,visit," + ",".join(COLUMNS)]
    lines += [f"{pid(i)},2020-01-{1 + i % 3 if i < 3 * REPEATED else 1:02d},{r}" for i, r in enumerate(rows)]
    (tmp_path / "ehr.csv").write_text("\n".join(lines) + "\n")
    demo_mapping = (demo / "sites" / "cleveland.toml").read_text()
    variables = demo_mapping[demo_mapping.index("[variables."):]

    def mapping(source: str = "", rule: str | None = None) -> "Path":
        text = (f'[site]\nid = "cleveland"\n[source]\npath = "ehr.csv"\npatient_key = "pid"\ntime = "visit"\n'
                f'missing_values = ["?"]\n{source}\n'
                + (variables.replace("column = ", f'reduce = "{rule}"\ncolumn = ') if rule else variables))
        path = tmp_path / "mapping.toml"
        path.write_text(text)
        return path

    demo_table, _ = load_site_table(load_mapping(demo / "sites" / "cleveland.toml", dictionary), dictionary)
    return mapping, demo_table


def config_for(tmp_path, demo, consortium_keys, mapping, name="site"):
    return load_site_config(write_site_config(
        tmp_path / f"{name}.toml", "cleveland", demo / "dictionary.toml", mapping, tmp_path / "state" / name,
        "127.0.0.1:0", 10.0, 1e-6, consortium_keys.site_keys["cleveland"][0], [consortium_keys.coordinator_pub]))


def rows_of(table, dictionary, rows):
    return {n: table.columns[n][rows] for n in dictionary.names}


def test_patients_with_several_rows_are_refused_without_a_rule(ehr, dictionary, demo, tmp_path, consortium_keys, capsys):
    mapping, _ = ehr
    path = mapping()
    with pytest.raises(MappingError) as e:
        load_site_table(load_mapping(path, dictionary), dictionary)
    message = str(e.value)
    assert re.search(r"ehr\.csv: patient key 'pid': 10 patient\(s\) have more than one row for variables\.\w+ "
                     r"\(up to 3 rows\)", message), message
    assert "not bounded" in message and "reduce = " in message and "rows_per_patient = k" in message
    assert "PX-" not in message  # never a patient id
    # `site check` (no keys needed) and `site serve` refuse it; the guard never starts, so nothing is debited
    assert main(["site", "check", "--dictionary", str(demo / "dictionary.toml"), "--mapping", str(path)]) == 2
    assert "have more than one row" in capsys.readouterr().err
    cfg = write_site_config(tmp_path / "site.toml", "cleveland", demo / "dictionary.toml", path, tmp_path / "state",
                            "127.0.0.1:0", 10.0, 1e-6, consortium_keys.site_keys["cleveland"][0],
                            [consortium_keys.coordinator_pub])
    assert main(["site", "serve", "--config", str(cfg)]) == 2
    assert "have more than one row" in capsys.readouterr().err
    assert not (tmp_path / "state" / "ledger.sqlite").exists()
    checks = {c.name: c for c in diagnose(cfg)}
    assert checks["mapping"].status == FAIL and "reduce rule" in checks["mapping"].fix


def test_a_source_without_a_patient_key_is_refused(ehr, dictionary):
    mapping, _ = ehr
    path = mapping()
    path.write_text(path.read_text().replace('patient_key = "pid"\n', ""))
    with pytest.raises(MappingError, match=r"mapping\.toml: \[source\] needs patient_key: the column holding the "
                                           r"patient id .* or patient_key = \"row\""):
        load_mapping(path, dictionary)


def test_rows_are_reduced_to_one_record_per_patient(ehr, dictionary, demo, tmp_path, consortium_keys, sign):
    mapping, demo_table = ehr
    table, report = load_site_table(load_mapping(mapping(rule="last"), dictionary), dictionary)
    assert (table.unit, table.rows_per_patient) == (privacy_unit.PATIENT, 1)
    assert table.n_rows == 303 - 2 * REPEATED and report.source_rows == 303
    latest = [3 * j + 2 for j in range(REPEATED)] + list(range(3 * REPEATED, 303))  # each patient's Jan 3 visit
    for n, col in rows_of(demo_table, dictionary, latest).items():
        assert np.array_equal(table.columns[n], col), n
    first, _ = load_site_table(load_mapping(mapping(rule="first"), dictionary), dictionary)
    earliest = [3 * j for j in range(REPEATED)] + list(range(3 * REPEATED, 303))
    for n, col in rows_of(demo_table, dictionary, earliest).items():
        assert np.array_equal(first.columns[n], col), n
    guard = SiteGuard(config_for(tmp_path, demo, consortium_keys, mapping(rule="last")))
    plan = pb.QueryPlan(plan_id="r1", dictionary_hash=dictionary.hash, coordinator="c", purpose="t",
                        marginals=[pb.MarginalQuery(variables=["age", "sex"], rho=0.02)])
    receipt = pb.BudgetReceipt.FromString(pb.Summary.FromString(guard.answer(sign(plan)).summary).receipt)
    assert (receipt.unit, receipt.rows_per_patient) == ("patient", 1)


@pytest.mark.parametrize("keep, kept", [
    ("latest", lambda j: [3 * j + 1, 3 * j + 2]),
    ("earliest", lambda j: [3 * j, 3 * j + 1]),
])
def test_k_rows_per_patient_are_kept_by_a_declared_rule(ehr, dictionary, keep, kept):
    mapping, demo_table = ehr
    table, report = load_site_table(load_mapping(mapping(f'rows_per_patient = 2\nkeep = "{keep}"'), dictionary),
                                    dictionary)
    assert (table.unit, table.rows_per_patient) == (privacy_unit.PATIENT_ROWS, 2)
    rows = sorted([r for j in range(REPEATED) for r in kept(j)] + list(range(3 * REPEATED, 303)))
    assert table.n_rows == len(rows) == 303 - REPEATED
    for n, col in rows_of(demo_table, dictionary, rows).items():
        assert np.array_equal(table.columns[n], col), n
    assert any(f"10 patient(s) had more than 2 rows (up to 3): 10 row(s) dropped" in n for n in report.notes)


def test_a_seeded_sample_of_k_rows_is_the_same_at_every_start(ehr, dictionary):
    mapping, demo_table = ehr

    def kept(seed):
        table, _ = load_site_table(load_mapping(mapping(f'rows_per_patient = 2\nkeep = "sample"\nseed = {seed}'),
                                                dictionary), dictionary)
        return np.stack([table.columns[n] for n in dictionary.names])

    a, b, c = kept(7), kept(7), kept(8)
    assert a.shape[1] == 303 - REPEATED and np.array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(MappingError, match=r"keep = \"sample\" needs a seed"):
        load_mapping(mapping('rows_per_patient = 2\nkeep = "sample"'), dictionary)


def test_k_row_units_are_charged_by_group_privacy(ehr, dictionary, demo, tmp_path, consortium_keys, sign):
    """The plan's rho is per patient: with k = 3 the noise is 3x larger and the debit is OpenDP's map at d_in = 3."""
    mapping, _ = ehr
    rho = 0.01
    plan = lambda pid: pb.QueryPlan(plan_id=pid, dictionary_hash=dictionary.hash, coordinator="c", purpose="t",
                                    marginals=[pb.MarginalQuery(variables=["age", "sex"], rho=rho),
                                               pb.MarginalQuery(variables=["chol"], rho=rho)])
    one = SiteGuard(config_for(tmp_path, demo, consortium_keys, mapping(rule="last"), "one"))
    three = SiteGuard(config_for(tmp_path, demo, consortium_keys, mapping("rows_per_patient = 3"), "three"))
    assert (three.config.privacy_unit, three.config.rows_per_patient) == ("patient_rows", 3)
    s1 = pb.Summary.FromString(one.answer(sign(plan("k1"))).summary)
    s3 = pb.Summary.FromString(three.answer(sign(plan("k3"))).summary)
    r3 = pb.BudgetReceipt.FromString(s3.receipt)
    assert (r3.unit, r3.rows_per_patient) == ("patient_rows", 3)
    assert r3.rho_debited == pytest.approx(2 * rho, rel=1e-9) and three.ledger.spent() == pytest.approx(2 * rho, rel=1e-9)
    for t1, t3 in zip(s1.marginals, s3.marginals):
        assert t3.noise_scale == pytest.approx(3 * t1.noise_scale, rel=1e-6)
        assert t3.noise_scale == pytest.approx(accounting.scale_for_rho(rho / 9), rel=1e-9)
        per_record = 1 / (2 * t3.noise_scale ** 2)
        assert t3.rho == pytest.approx(9 * per_record, rel=1e-6) and t3.rho <= rho * (1 + 1e-9)
    policies = [json.loads(p) for p in three.ledger.policies().values()]  # the unit is part of the recorded policy
    assert any(p["unit"] == "patient_rows" and p["rows_per_patient"] == 3 for p in policies)


def test_attested_rows_are_stated_as_such(guards, dictionary, sign):
    g = guards("va")
    plan = pb.QueryPlan(plan_id="a1", dictionary_hash=dictionary.hash, coordinator="c", purpose="t",
                        marginals=[pb.MarginalQuery(variables=["sex"], rho=0.01)])
    summary = pb.Summary.FromString(g.stub.Answer(sign(plan)).summary)
    receipt = pb.BudgetReceipt.FromString(summary.receipt)
    assert (receipt.unit, receipt.rows_per_patient) == ("patient_attested_row", 1)


def _result(site, unit, k, rho=0.1, seq=1):
    receipt = pb.BudgetReceipt(site=site, plan_id=f"p{seq}", rho_debited=rho, rho_spent_total=rho * seq, rho_limit=1.0,
                               delta=1e-6, ledger_seq=seq, unit=unit, rows_per_patient=k)
    return SiteResult(site, pb.Summary(site=site, receipt=receipt.SerializeToString()), receipt, "fp")


@pytest.mark.parametrize("units, statement", [
    ({"a": ("patient", 1), "b": ("patient", 1)}, "one patient at one site, added or removed with all of their records "
                                                 "(each site reduces a patient's rows to one record by its declared rules)"),
    ({"a": ("patient", 1), "b": ("patient_rows", 3)}, "b: up to 3 records per patient, charged 9x by group privacy"),
    ({"a": ("patient_attested_row", 1)}, "a: one row per patient as attested by the site admin (no patient id)"),
    ({"a": ("", 0), "b": ("patient", 1)}, "except where a site states only a row unit; a: one table row"),
    ({"a": ("", 0)}, "one table row at one site, added or removed (no site's guard states a patient unit)"),
])
def test_the_manifest_states_the_unit_of_the_receipts(units, statement):
    answered = {s: [_result(s, u, k)] for s, (u, k) in units.items()}
    privacy = mf.privacy_section(1e-6, 0, answered, [])
    assert statement in privacy["unit"]
    for s, (u, k) in units.items():
        assert privacy["site_units"][s]["unit"] == u and privacy["site_units"][s]["rows_per_patient"] == max(k, 1)
        entry = mf.site_entry(answered[s])
        assert (entry["unit"], entry["rows_per_patient"]) == (u, max(k, 1))
        assert (mf.receipt_entry(answered[s][0])["unit"], mf.receipt_entry(answered[s][0])["rows_per_patient"]) == (u, k)


def test_a_site_whose_receipts_disagree_is_stated_at_its_weakest():
    rs = [_result("a", "patient", 1, seq=1), _result("a", "patient_rows", 2, seq=2)]
    assert mf.site_unit(rs) == ("patient_rows", 2)
    assert mf.site_unit(rs + [_result("a", "", 0, seq=3)]) == ("", 1)


def test_a_release_states_each_sites_unit(ehr, dictionary, demo, tmp_path, consortium_keys):
    """A real release from a k = 2 site and an attested-row site: manifest and report name both units."""
    from ppsehr.deploy.transports import DirectTransport
    from ppsehr.server.pipeline import Events, ReleaseJob, run_release
    from ppsehr.server.release.bundle import verify_release

    mapping, _ = ehr
    running = [RunningGuard(SiteGuard(config_for(tmp_path, demo, consortium_keys, mapping("rows_per_patient = 2"))))]
    va = write_site_config(tmp_path / "va.toml", "va", demo / "dictionary.toml", demo / "sites" / "va.toml",
                           tmp_path / "state" / "va", "127.0.0.1:0", 10.0, 1e-6, consortium_keys.site_keys["va"][0],
                           [consortium_keys.coordinator_pub])
    running.append(RunningGuard(SiteGuard(load_site_config(va))))
    try:
        job = ReleaseJob.create(dictionary=str(demo / "dictionary.toml"), out=str(tmp_path / "rel"),
                                signing_key=str(consortium_keys.coordinator_key),
                                site_keys={s: str(p[1]) for s, p in consortium_keys.site_keys.items()}, epsilon=1.0,
                                seed=1, formats=["csv"], report=True)
        run_release(job, DirectTransport({g.guard.config.site: g.address for g in running}), Events())
    finally:
        for g in running:
            g.stop()
    m = verify_release(tmp_path / "rel")
    assert m["sites"]["cleveland"]["unit"] == "patient_rows" and m["sites"]["cleveland"]["rows_per_patient"] == 2
    assert m["sites"]["va"]["unit"] == "patient_attested_row"
    assert all(r["unit"] == m["sites"][r["site"]]["unit"] for r in m["receipts"])
    assert "cleveland: up to 2 records per patient, charged 4x by group privacy" in m["privacy"]["unit"]
    assert "va: one row per patient as attested by the site admin" in m["privacy"]["unit"]
    cleveland = Ledger(tmp_path / "state" / "site" / "ledger.sqlite", 1.0, "cleveland").spent()
    assert math.isclose(cleveland, m["sites"]["cleveland"]["rho"], rel_tol=1e-9)
    report = (tmp_path / "rel" / "report.html").read_text()
    assert "charged 4x by group privacy" in report


def test_secure_sums_charge_k_row_units_by_group_privacy(site_config, dictionary):
    """A secure plan's share of the noise is calibrated for rho / k^2 per record; the patient is charged k^2 times
    the distributed bound, and rho_alone is OpenDP's map at d_in = k."""
    import dataclasses

    from ppsehr.client.guard import compile_plan

    config = dataclasses.replace(site_config("cleveland", secure=True), rows_per_patient=3)
    plan = pb.QueryPlan(plan_id="s1", dictionary_hash=dictionary.hash, coordinator="c", purpose="t",
                        marginals=[pb.MarginalQuery(variables=["age", "sex"], rho=0.02)],
                        secure=pb.SecureAggregation(colluding=0, min_parties=3))
    (k3,) = compile_plan(plan, dictionary, config, honest=3)
    (k1,) = compile_plan(plan, dictionary, dataclasses.replace(config, rows_per_patient=1), honest=3)
    cells = math.prod(k3.shape)
    assert k3.scale == pytest.approx(accounting.share_scale_for_rho(0.02 / 9, 3, cells), rel=1e-12)
    assert k3.rho == pytest.approx(9 * accounting.distributed_rho(k3.scale, 3, cells), rel=1e-12) and k3.rho <= 0.02
    assert k3.rho_alone == pytest.approx(float(k3.measurement.map(3)), rel=1e-12)
    assert k3.rho_alone == pytest.approx(9 / (2 * k3.scale ** 2), rel=1e-6)
    assert k3.scale == pytest.approx(3 * k1.scale, rel=1e-3)
