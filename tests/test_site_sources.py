"""Multi-table site sources on DuckDB: files and database tables joined by patient key, reduced per patient."""

from __future__ import annotations

import sqlite3
import textwrap

import numpy as np
import pytest

from ppsehr.client.config import load_site_config
from ppsehr.client.guard import SiteGuard
from ppsehr.common import privacy_unit
from ppsehr.common.dictionary import MISSING, load_dictionary
from ppsehr.common.errors import MappingError
from ppsehr.common.mapping import load_mapping
from ppsehr.common.source import load_site_table
from ppsehr.deploy.cli import main
from ppsehr.deploy.local import write_site_config
from ppsehr.protos import guard_pb2 as pb

DICTIONARY = """
[dictionary]
name = "multi"
version = "1"
[variables.age]
type = "numeric"
unit = "a"
bins = [0, 40, 60, 80, 120]
missing = false
[variables.sex]
type = "categorical"
categories = ["female", "male"]
missing = false
[variables.chol]
type = "numeric"
unit = "mg/dL"
molar_mass = 386.65
bins = [0, 200, 240, 1000]
[variables.glucose_max]
type = "numeric"
unit = "mg/dL"
molar_mass = 180.16
bins = [0, 100, 126, 1000]
[variables.admissions]
type = "numeric"
bins = [0, 1, 2, 3, 100]
missing = false
[variables.ward]
type = "categorical"
categories = ["medicine", "surgery", "icu"]
[variables.diabetes]
type = "categorical"
categories = ["no", "yes"]
missing = false
"""

PATIENTS = "pid,age,sex\nP1,35,F\nP2,61,M\nP3,47,male\nP4,80,F\nP5,59,M\n"  # "male" passes through the partial map
ADMISSIONS = [("P1", "2020-03-01", "SURG"), ("P2", "2019-01-10", "MED"), ("P1", "2020-01-15", "MED"),
              ("P2", "2020-06-01", "ICU"), ("P2", "2021-02-02", "MED"), ("P3", "2020-05-05", "ICU"),
              ("P5", "2022-07-07", "SURG")]
# labs in mmol/L with decimal commas, latin-1, ';'-separated; Pé9 is not a patient of the cohort
LABS = ("subject;test;value;taken;note\n"
        "P1;CHOL;5,2;2019-06-01;\n"  # 201.06 mg/dL -> 201, within a year before P1's first admission (2020-01-15)
        "P1;CHOL;6,4;2020-02-01;après\n"  # after the index: outside the window [-365, 0]
        "P1;GLU;5,55;2019-06-01;\n"  # 99.99 mg/dL -> 100 at precision 0: [100, 126)
        "P2;CHOL;4,0;2018-03-01;\n"  # 154.66 -> 155, 315 days before 2019-01-10
        "P2;CHOL;6,5;2018-12-01;\n"  # 251.32 -> 251: the latest in the window
        "P2;GLU;7,1;2018-12-01;\n"  # 127.9 -> 128
        "P2;GLU;5,0;2019-12-01;\n"
        "P3;GLU;;2020-01-01;\n"  # empty: missing
        "Pé9;CHOL;5,0;2020-01-01;\n")
DX = [("P2", "E11.9", "2015-01-01"), ("P4", "I10", "2019-01-01"), ("P5", "E11", "2021-01-01"), ("P1", "J45", "2020-01-01")]

MAPPING = """
[site]
id = "multi"
[source]
patient_key = "pid"
cohort = "patients"
{database}
[source.tables.patients]
{patients}
[source.tables.admissions]
{admissions}
time = "admit"
[source.tables.labs]
{labs}
key = "subject"
time = "taken"
[source.tables.dx]
{dx}
[source.index]
table = "admissions"
rule = "first"

[variables.age]
column = "age"
[variables.sex]
column = "sex"
values = {{ F = "female", M = "male" }}
[variables.chol]
table = "labs"
column = "value"
where = {{ test = "CHOL" }}
unit = "mmol/L"
reduce = "last"
window_days = [-365, 0]
[variables.glucose_max]
table = "labs"
column = "value"
where = {{ test = ["GLU"] }}
unit = "mmol/L"
reduce = "max"
[variables.admissions]
table = "admissions"
reduce = "count"
[variables.ward]
table = "admissions"
column = "ward"
values = {{ MED = "medicine", SURG = "surgery", ICU = "icu" }}
reduce = "first"
[variables.diabetes]
table = "dx"
where = {{ icd = "E11*" }}
reduce = "any"
recorded = "yes"
not_recorded = "no"
"""

FILES = dict(database="", patients='path = "patients.csv"', admissions='path = "admissions.parquet"',
             labs='path = "labs.csv"\ndelimiter = ";"\ndecimal = ","\nencoding = "latin-1"', dx='table = "dx"')

EXPECTED = {  # per patient P1..P5, computed by hand above
    "age": ["[0,40)", "[60,80)", "[40,60)", "[80,120]", "[40,60)"],
    "sex": ["female", "male", "male", "female", "male"],
    "chol": ["[200,240)", "[240,1000]", MISSING, MISSING, MISSING],
    "glucose_max": ["[100,126)", "[126,1000]", MISSING, MISSING, MISSING],
    "admissions": ["[2,3)", "[3,100]", "[1,2)", "[0,1)", "[1,2)"],
    "ward": ["medicine", "medicine", "icu", MISSING, "surgery"],
    "diabetes": ["no", "yes", "no", "no", "yes"],
}


def write_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "patients.csv").write_text(PATIENTS)
    pq.write_table(pa.table({"pid": [a[0] for a in ADMISSIONS], "admit": [a[1] for a in ADMISSIONS],
                             "ward": [a[2] for a in ADMISSIONS]}), tmp_path / "admissions.parquet")
    (tmp_path / "labs.csv").write_bytes(LABS.encode("latin-1"))
    db = sqlite3.connect(tmp_path / "site.sqlite")
    db.execute("CREATE TABLE dx (pid TEXT, icd TEXT, date TEXT)")
    db.executemany("INSERT INTO dx VALUES (?, ?, ?)", DX)
    db.commit()
    db.close()


@pytest.fixture
def multi(tmp_path):
    (tmp_path / "dictionary.toml").write_text(DICTIONARY)
    d = load_dictionary(tmp_path / "dictionary.toml")
    write_sources(tmp_path)

    def mapping(**parts):
        text = MAPPING.format(**({**FILES, "database": 'database = "site.sqlite"'} | parts))
        path = tmp_path / "mapping.toml"
        path.write_text(text)
        return path

    return d, mapping, tmp_path


def labels(d, table, name):
    return [d[name].cells[c] for c in table.columns[name]]


def test_files_and_a_database_table_join_by_patient_key_and_reduce_by_rule(multi):
    d, mapping, _ = multi
    table, report = load_site_table(load_mapping(mapping(), d), d)
    assert table.n_rows == 5 and table.unit == privacy_unit.PATIENT and table.rows_per_patient == 1
    for name, want in EXPECTED.items():
        assert labels(d, table, name) == want, name
    assert report.source_rows == 5 + len(ADMISSIONS) + 9 + len(DX)
    assert any("1 row(s) of patients not in the cohort" in n for n in report.notes)
    assert "privacy unit: one patient" in report.to_text()


def test_the_same_source_from_a_duckdb_database(multi):
    import duckdb

    d, mapping, tmp = multi
    files, _ = load_site_table(load_mapping(mapping(), d), d)
    con = duckdb.connect(str(tmp / "site.duckdb"))
    con.execute(f"CREATE TABLE patients AS SELECT * FROM read_csv('{tmp / 'patients.csv'}', all_varchar=true)")
    con.execute(f"CREATE TABLE admissions AS SELECT pid, CAST(admit AS DATE) AS admit, ward FROM "
                f"read_parquet('{tmp / 'admissions.parquet'}')")
    con.execute("CREATE TABLE labs (subject VARCHAR, test VARCHAR, value DOUBLE, taken TIMESTAMP)")
    for line in LABS.splitlines()[1:]:
        s, t, v, when, _ = line.split(";")
        con.execute("INSERT INTO labs VALUES (?, ?, ?, ?)", [s, t, float(v.replace(",", ".")) if v else None, when])
    con.execute("CREATE TABLE dx (pid VARCHAR, icd VARCHAR)")
    con.executemany("INSERT INTO dx VALUES (?, ?)", [r[:2] for r in DX])
    con.close()
    db, _ = load_site_table(load_mapping(mapping(database='database = "site.duckdb"', patients='table = "patients"',
                                                 admissions='table = "admissions"', labs='table = "labs"'), d), d)
    for name in d.names:
        assert np.array_equal(files.columns[name], db.columns[name]), name


def test_a_two_table_source_answers_plans_as_patients(multi, consortium_keys, sign, tmp_path):
    d, mapping, _ = multi
    cfg = write_site_config(tmp_path / "site.toml", "multi", tmp_path / "dictionary.toml", mapping(), tmp_path / "state",
                            "127.0.0.1:0", 10.0, 1e-6, consortium_keys.site_keys["va"][0], [consortium_keys.coordinator_pub])
    guard = SiteGuard(load_site_config(cfg))
    plan = pb.QueryPlan(plan_id="p1", dictionary_hash=d.hash, coordinator="c", purpose="t",
                        marginals=[pb.MarginalQuery(variables=["sex", "diabetes"], rho=0.01)],
                        addressees=[pb.Addressee(site="multi", signer=guard.fingerprint)])
    summary = pb.Summary.FromString(guard.answer(sign(plan)).summary)
    receipt = pb.BudgetReceipt.FromString(summary.receipt)
    assert (receipt.unit, receipt.rows_per_patient) == ("patient", 1)
    assert receipt.rho_debited == pytest.approx(0.01, rel=1e-9)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace('column = "ward"', 'column = "wrd"'),
     r"admissions\.parquet: column 'wrd' not found \(needed by variables\.ward\); did you mean 'ward'\?"),
    (lambda t: t.replace('table = "admissions"\nreduce = "count"', 'table = "admission"\nreduce = "count"'),
     r"variables\.admissions\.table: 'admission' is not a table of the source; did you mean 'admissions'\?"),
    (lambda t: t.replace('reduce = "max"', 'reduce = "maximum"'),
     r"variables\.glucose_max\.reduce: a numeric variable takes one of"),
    (lambda t: t.replace('[source.index]\ntable = "admissions"\nrule = "first"\n', ''),
     r"variables\.chol: window_days needs an index event"),
    (lambda t: t.replace('decimal = ","\n', ''),
     r"labs\.csv, data row 1 \(line 2\), column 'value' \(variables\.chol\): '5,2' is not a number \(a decimal comma\?"),
    (lambda t: t.replace('encoding = "latin-1"', 'encoding = "utf-8"'), r"labs\.csv, line 10: not utf-8 text"),
    (lambda t: t.replace('[source.tables.dx]\ntable = "dx"', '[source.tables.dx]\ntable = "diagnoses"'),
     r"site\.sqlite: no table 'diagnoses' \(needed by .*source\.tables\.dx\)"),
])
def test_source_mistakes_name_file_variable_and_row(multi, change, message):
    d, mapping, tmp = multi
    path = mapping()
    path.write_text(change(path.read_text()))
    with pytest.raises(MappingError, match=message):
        load_site_table(load_mapping(path, d), d)


def test_a_bad_time_is_named(multi):
    d, mapping, tmp = multi
    (tmp / "labs.csv").write_bytes(LABS.replace("2018-12-01;\nP2;GLU;5,0", "01/12/2018;\nP2;GLU;5,0").encode("latin-1"))
    with pytest.raises(MappingError, match=r"labs\.csv, data row 6 \(line 7\), column 'taken' \(source\.tables\.labs"
                                           r"\.time\): '01/12/2018' is not a date or time"):
        load_site_table(load_mapping(mapping(), d), d)


def test_a_table_larger_than_the_memory_limit_loads(tmp_path):
    """100,000 lab rows of 10,000 patients under a 32 MB DuckDB memory limit (it spills to its private temp dir)."""
    rng = np.random.default_rng(1)
    n = 100_000
    pid = rng.integers(0, 10_000, n)
    value = np.round(rng.uniform(2, 9, n), 2)
    with open(tmp_path / "labs.csv", "w") as f:
        f.write("pid,value,day\n")
        f.writelines(f"P{p},{v},2020-01-{1 + i % 28:02d}\n" for i, (p, v) in enumerate(zip(pid, value)))
    (tmp_path / "dictionary.toml").write_text(
        '[dictionary]\nname = "big"\nversion = "1"\n[variables.chol_mean]\ntype = "numeric"\nunit = "mg/dL"\n'
        'molar_mass = 386.65\nbins = [0, 150, 200, 250, 300, 400]\nprecision = 0\n')
    (tmp_path / "mapping.toml").write_text(textwrap.dedent("""
        [site]
        id = "big"
        [source]
        path = "labs.csv"
        patient_key = "pid"
        time = "day"
        memory_limit = "32MB"
        [variables.chol_mean]
        column = "value"
        unit = "mmol/L"
        reduce = "mean"
        """))
    d = load_dictionary(tmp_path / "dictionary.toml")
    table, report = load_site_table(load_mapping(tmp_path / "mapping.toml", d), d)
    assert table.n_rows == len(np.unique(pid)) and report.source_rows == n
    means = {p: value[pid == p].mean() * 38.665 for p in np.unique(pid)[:50]}
    order = list(dict.fromkeys(pid.tolist()))  # patients in order of their first row
    for p, mg in means.items():
        cell = table.columns["chol_mean"][order.index(p)]
        assert d["chol_mean"].bins[cell] <= round(mg) < d["chol_mean"].bins[cell + 1] or round(mg) == 400


def test_site_check_needs_no_keys(multi, capsys):
    d, mapping, tmp = multi
    assert main(["site", "check", "--dictionary", str(tmp / "dictionary.toml"), "--mapping", str(mapping())]) == 0
    out = capsys.readouterr().out
    assert "5 records from" in out and "privacy unit: one patient, with all of their rows reduced" in out
