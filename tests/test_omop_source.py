"""OMOP CDM as a site source: the GiBleed subset through an OMOP mapping, a guard on it, and bad input."""

from __future__ import annotations

import csv
import datetime as dt
import math
import shutil
import sqlite3
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from ppsehr.client.config import load_site_config
from ppsehr.client.guard import SiteGuard
from ppsehr.common.dictionary import load_dictionary
from ppsehr.common.errors import MappingError
from ppsehr.deploy.local import write_site_config
from ppsehr.common.mapping import load_mapping
from ppsehr.common.source import load_site_table
from ppsehr.protos import guard_pb2 as pb
from ppsehr.server.measure import planner

DATA = Path(__file__).parent / "data"
CDM = DATA / "omop-gibleed"
MAPPING = DATA / "omop-gibleed-mapping.toml"


@pytest.fixture(scope="module")
def gib():
    return load_dictionary(DATA / "omop-gibleed-dictionary.toml")


def rows(table, cdm=CDM):
    with open(cdm / f"{table}.csv", newline="") as f:
        return list(csv.DictReader(f))


def labels(table, dictionary, name):
    cells = dictionary[name].cells
    return [cells[k] for k in table.columns[name]]


def copy_cdm(tmp_path, mapping_text=None):
    """A private copy of the subset and the mapping, to break on purpose."""
    shutil.copytree(CDM, tmp_path / "omop-gibleed")
    path = tmp_path / "mapping.toml"
    path.write_text(mapping_text or MAPPING.read_text())
    return tmp_path / "omop-gibleed", path


def expected_gibleed():
    """The harmonized values, computed directly from the CSV files with plain Python."""
    index = {}
    for r in rows("observation_period"):
        d = dt.date.fromisoformat(r["observation_period_end_date"])
        index[r["person_id"]] = max(index.get(r["person_id"], d), d)
    conds = defaultdict(list)
    for r in rows("condition_occurrence"):
        conds[r["person_id"]].append((dt.date.fromisoformat(r["condition_start_date"]), int(r["condition_concept_id"])))
    sinusitis = {4283893} | {int(r["descendant_concept_id"]) for r in rows("concept_ancestor")
                             if r["ancestor_concept_id"] == "4283893"}
    spiro = {r["person_id"] for r in rows("measurement") if r["measurement_concept_id"] == "4133840"
             and dt.date.fromisoformat(r["measurement_date"]) <= index[r["person_id"]]}
    out = defaultdict(list)
    for p in rows("person"):
        pid, ix = p["person_id"], index[p["person_id"]]
        age = ix.year - int(p["year_of_birth"]) - ((ix.month, ix.day) < (int(p["month_of_birth"]), int(p["day_of_birth"])))
        out["age"].append(age)
        out["sex"].append({"8532": "female", "8507": "male"}[p["gender_concept_id"]])
        out["race"].append({"8527": "white", "8516": "black", "8515": "asian"}.get(p["race_concept_id"], "missing"))
        before = [(d, c) for d, c in conds[pid] if d <= ix]
        out["gi_bleed"].append("yes" if any(c == 192671 for _, c in before) else "no")
        cardiac = sorted((d, -k) for d, c in before for k, cc in enumerate((317576, 4329847)) if c == cc)
        out["cardiac"].append(("none", "coronary_arteriosclerosis", "myocardial_infarction")[-cardiac[-1][1] + 1]
                              if cardiac else "none")
        out["sinusitis"].append("yes" if any(c in sinusitis for _, c in before) else "no")
        out["spirometry"].append("yes" if pid in spiro else "no")
        mi = [r for r in rows("observation") if r["person_id"] == pid and r["observation_concept_id"] == "4163874"
              and ix - dt.timedelta(days=3650) <= dt.date.fromisoformat(r["observation_date"]) <= ix]
        out["mi_history"].append("yes" if mi else "no")
    return out


def test_gibleed_subset_is_small_and_documented():
    size = sum(f.stat().st_size for f in CDM.iterdir())
    assert size < 300_000 and (CDM / "PROVENANCE.md").exists()
    assert 50 <= len(rows("person")) <= 100


def test_site_table_from_the_gibleed_cdm_matches_a_direct_reading(gib):
    table, report = load_site_table(load_mapping(MAPPING, gib), gib)
    want = expected_gibleed()
    assert table.n_rows == report.n_rows == len(rows("person"))
    age = gib["age"]
    assert [age.bin_label(k) for k in table.columns["age"]] == \
           [age.bin_label(int(np.searchsorted(age.bins, a, side="right")) - 1) for a in want["age"]]
    for name in ("sex", "race", "gi_bleed", "cardiac", "sinusitis", "spirometry", "mi_history"):
        assert labels(table, gib, name) == want[name], name
    # the data exercise what the mapping claims: descendants, both cardiac categories, lookback
    assert {"coronary_arteriosclerosis", "myocardial_infarction"} <= set(want["cardiac"])
    direct = {r["person_id"] for r in rows("condition_occurrence") if r["condition_concept_id"] == "4283893"}
    assert len(direct) < want["sinusitis"].count("yes")
    assert report.variables["race"].unmapped == want["race"].count("missing") > 0
    assert "0 missing" in report.to_text()


def test_guard_answers_a_plan_over_the_omop_site(tmp_path, gib, consortium_keys, sign):
    from conftest import RunningGuard

    cfg = write_site_config(tmp_path / "gibleed.toml", "gibleed", DATA / "omop-gibleed-dictionary.toml", MAPPING,
                            tmp_path / "state", "127.0.0.1:0", 5.0, 1e-6, consortium_keys.site_keys["cleveland"][0],
                            [consortium_keys.coordinator_pub])
    g = RunningGuard(SiteGuard(load_site_config(cfg)))
    try:
        plan = planner.to_proto(planner.one_round_plan(gib, 0.3), gib, "tester", "omop source",
                                addressees=[pb.Addressee(site="gibleed", signer=g.guard.fingerprint)])
        summary = pb.Summary.FromString(g.stub.Answer(sign(plan)).summary)
        assert summary.site == "gibleed" and summary.dictionary_hash == gib.hash
        n = len(rows("person"))
        for got, want in zip(summary.marginals, plan.marginals):
            shape = tuple(gib[v].size for v in want.variables)
            assert tuple(got.shape) == shape and len(got.counts) == math.prod(shape)
            # the noisy total is the cohort size up to noise (6 sigma of the summed cells)
            assert abs(sum(got.counts) - n) <= 6 * got.noise_scale * math.sqrt(len(got.counts)) + 1
        receipt = pb.BudgetReceipt.FromString(summary.receipt)
        assert receipt.rho_debited == pytest.approx(sum(m.rho for m in summary.marginals))
    finally:
        g.stop()


def test_sqlite_cdm_gives_the_same_table(tmp_path, gib):
    db = tmp_path / "cdm.sqlite"
    with sqlite3.connect(db) as con:
        for f in CDM.glob("*.csv"):
            data = rows(f.stem)
            cols = list(data[0])
            con.execute(f"CREATE TABLE {f.stem} ({', '.join(cols)})")
            con.executemany(f"INSERT INTO {f.stem} VALUES ({', '.join('?' * len(cols))})",
                            [[None if r[c] == "" else r[c] for c in cols] for r in data])
    con.close()
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(MAPPING.read_text().replace('path = "omop-gibleed"', 'path = "cdm.sqlite"'))
    a, _ = load_site_table(load_mapping(MAPPING, gib), gib)
    b, _ = load_site_table(load_mapping(mapping, gib), gib)
    assert all(np.array_equal(a.columns[n], b.columns[n]) for n in gib.names)
    with sqlite3.connect(db) as con:
        con.execute("DROP TABLE observation")
    con.close()
    with pytest.raises(MappingError, match=r"cdm\.sqlite, table observation not found \(needed by .*variables\.mi_history"):
        load_site_table(load_mapping(mapping, gib), gib)


@pytest.mark.parametrize("breakage, message", [
    (lambda cdm, m: (cdm / "measurement.csv").unlink(),
     r"omop-gibleed/measurement\.csv not found \(needed by .*mapping\.toml: variables\.spirometry\)"),
    (lambda cdm, m: drop_column(cdm / "observation.csv", "observation_date"),
     r"omop-gibleed/observation\.csv: column\(s\) \['observation_date'\] not found \(needed by .*variables\.mi_history\)"),
    (lambda cdm, m: m.write_text(m.read_text().replace("concepts = [192671]", "concepts = [999999999]")),
     r"mapping\.toml: variables\.gi_bleed: concept 999999999 is not in .*omop-gibleed/concept\.csv \(field concept_id\)"),
    (lambda cdm, m: (cdm / "concept_ancestor.csv").unlink(),
     r"concept_ancestor\.csv not found \(needed by .*variables\.sinusitis \(descendants = true\)\)"),
    (lambda cdm, m: edit_first(cdm / "condition_occurrence.csv", "condition_start_date", "10/02/2015"),
     r"condition_occurrence\.csv, data row 1, field condition_start_date: '10/02/2015' is not a date"),
    (lambda cdm, m: edit_first(cdm / "person.csv", "gender_concept_id", "8551"),
     r"person\.csv, person_id \d+, field gender_concept_id: code '8551' is not mapped to a category of 'sex'"),
    (lambda cdm, m: m.write_text(m.read_text().replace('not_recorded = "none"', 'not_recorded = "unknown"')),
     r"variables\.cardiac: 'unknown' is not a category of 'cardiac'"),
    (lambda cdm, m: m.write_text(m.read_text().replace('omop = "age"', 'omop = "age_at_index"')),
     r"variables\.age\.omop: must be one of"),
    (lambda cdm, m: m.write_text(m.read_text().replace('omop = "age"', 'omop = "age"\nconcepts = [1]')),
     r"variables\.age: unknown key 'concepts' for omop = 'age'"),
    (lambda cdm, m: m.write_text(m.read_text().replace('omop = "age"', 'column = "age"')),
     r"variables\.age: with source\.format = \"omop\", define it with omop = \.\.\."),
])
def test_bad_cdm_or_mapping_names_the_file_and_field(tmp_path, gib, breakage, message):
    cdm, mapping = copy_cdm(tmp_path)
    breakage(cdm, mapping)
    with pytest.raises(MappingError, match=message):
        load_site_table(load_mapping(mapping, gib), gib)


def drop_column(path, column):
    data = rows(path.stem, path.parent)
    cols = [c for c in data[0] if c != column]
    write(path, cols, data)


def edit_first(path, column, value):
    data = rows(path.stem, path.parent)
    data[0][column] = value
    write(path, list(data[0]), data)


def write(path, cols, data):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(cols)
        w.writerows([r[c] for c in cols] for r in data)


CHOL_DICTIONARY = """
[dictionary]
name = "chol-test"
version = "1"
[variables.chol]
type = "numeric"
unit = "mg/dL"
molar_mass = 386.65
bins = [0, 150, 200, 250, 400]
[variables.age]
type = "numeric"
unit = "mo"
bins = [0, 600, 1200]
out_of_range = "missing"
"""


@pytest.mark.parametrize("rule, want", [
    ("latest", [193.3, "", 180.0]),  # person 1: latest before index is 5 mmol/L = 193.3 mg/dL; person 2: only after
    ("first", [150.0, "", 180.0]),
    ("max", [193.3, "", 180.0]),
    ("min", [150.0, "", 180.0]),
    ("mean", [(150.0 + 193.325) / 2, "", 180.0]),
])
def test_latest_measurement_in_the_dictionary_unit(tmp_path, rule, want):
    d, mapping = chol_site(tmp_path, f'value = "{rule}"')
    from ppsehr.common.omop import read_columns

    cols, _, _ = read_columns(load_mapping(mapping, d), d)
    got = cols["omop:chol"]
    assert [g if w == "" else round(float(g), 1) for g, w in zip(got, want)] == \
           ["" if w == "" else round(w, 1) for w in want]
    table, report = load_site_table(load_mapping(mapping, d), d)
    assert report.variables["chol"].missing == 1
    # age in months from a fixed index date, with the birthday not yet reached for person 3
    assert [float(x) for x in cols["omop:age"]] == [40 * 12, 50 * 12, 29 * 12]


def test_unknown_measurement_unit_names_row_and_field(tmp_path):
    d, mapping = chol_site(tmp_path, 'value = "latest"', extra_row="9,3,3027114,2019-01-01,4.0,8636\n")
    with pytest.raises(MappingError, match=r"measurement\.csv, data row 5, field unit_concept_id: unit concept 8636 "
                                           r"of 'chol' is unknown; add it to variables\.chol\.units"):
        load_site_table(load_mapping(mapping, d), d)


def chol_site(tmp_path, value_rule, extra_row=""):
    """A three-person CDM (synthetic values written here) with cholesterol in two units."""
    cdm = tmp_path / "cdm"
    cdm.mkdir()
    (cdm / "person.csv").write_text("person_id,gender_concept_id,year_of_birth,month_of_birth,day_of_birth\n"
                                    "1,8532,1980,1,1\n2,8507,1970,,\n3,8532,1990,12,31\n")
    (cdm / "measurement.csv").write_text(
        "measurement_id,person_id,measurement_concept_id,measurement_date,value_as_number,unit_concept_id\n"
        "1,1,3027114,2010-05-01,150,8840\n"         # mg/dL via concept.csv (UCUM)
        "2,1,3027114,2019-06-30,5.0,8753\n"         # mmol/L, declared in the mapping
        "3,1,3027114,2021-01-01,400,8840\n"         # after the index date: ignored
        "4,3,3027114,2015-01-01,180,\n" + extra_row  # no unit concept: the mapping's default unit
        + "5,2,3027114,2020-02-01,210,8840\n")
    (cdm / "concept.csv").write_text("concept_id,concept_name,domain_id,vocabulary_id,concept_class_id,standard_concept,"
                                     "concept_code\n3027114,Cholesterol [Mass/volume] in Serum or Plasma,Measurement,"
                                     "LOINC,Lab Test,S,2093-3\n8840,milligram per deciliter,Unit,UCUM,Unit,S,mg/dL\n")
    (tmp_path / "dictionary.toml").write_text(CHOL_DICTIONARY)
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(f"""
[site]
id = "t"
[source]
format = "omop"
path = "cdm"
index_date = "2020-01-01"
[variables.chol]
omop = "measurement"
concepts = [3027114]
{value_rule}
units = {{ "8753" = "mmol/L" }}
unit = "mg/dL"
[variables.age]
omop = "age"
""")
    return load_dictionary(tmp_path / "dictionary.toml"), mapping


def test_persons_without_an_index_date_are_left_out_and_reported(tmp_path, gib):
    cdm, mapping = copy_cdm(tmp_path)
    periods = rows("observation_period", cdm)
    write(cdm / "observation_period.csv", list(periods[0]), periods[1:])
    table, report = load_site_table(load_mapping(mapping, gib), gib)
    assert table.n_rows == len(rows("person")) - 1
    assert report.notes == ["1 person(s) without an observation period were left out "
                            "(index_date = observation_period_end)"]
    assert "note: 1 person(s) without an observation period" in report.to_text()
