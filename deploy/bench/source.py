"""`ppsehr bench source`: a site guard on a large multi-table source, in bounded memory.

Generates (once, with DuckDB) a synthetic site: `patients.parquet` (rows / 10 patients: age,
sex, BMI, enrolment date) and `labs.csv` (`rows` lab results in five tests, 2019-2021), and a
mapping that reduces each patient's lab rows by rule (last cholesterol within a year before
enrolment, maximum glucose, mean haemoglobin, first LDL, maximum creatinine in umol/L, number of
results, any HbA1c). Then, in a fresh process: start a real SiteGuard (load + join + reduce, with
DuckDB's memory_limit), and answer one signed 100-marginal plan (10 one-way, 45 two-way and 45
three-way tables). Reports wall time per stage and the process's peak resident set size.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DICTIONARY = """
[dictionary]
name = "bench-source"
version = "1"
[variables.age]
type = "numeric"
unit = "a"
bins = [18, 30, 40, 50, 60, 70, 80, 90, 105]
missing = false
[variables.sex]
type = "categorical"
categories = ["female", "male"]
[variables.bmi]
type = "numeric"
unit = "kg/m2"
bins = [12, 18.5, 25, 30, 35, 60]
precision = 1
[variables.chol]
type = "numeric"
unit = "mg/dL"
molar_mass = 386.65
bins = [80, 150, 200, 240, 280, 400]
[variables.glucose_max]
type = "numeric"
unit = "mg/dL"
molar_mass = 180.16
bins = [40, 100, 126, 200, 600]
[variables.hb_mean]
type = "numeric"
unit = "g/dL"
bins = [5, 10, 12, 14, 16, 20]
precision = 1
[variables.ldl_first]
type = "numeric"
unit = "mg/dL"
molar_mass = 386.65
bins = [20, 100, 130, 160, 190, 300]
[variables.creatinine_max]
type = "numeric"
unit = "mg/dL"
molar_mass = 113.12
bins = [0.2, 0.7, 1.0, 1.3, 2.0, 15]
precision = 2
[variables.n_labs]
type = "numeric"
bins = [0, 5, 10, 15, 20, 1000]
missing = false
[variables.hba1c_tested]
type = "categorical"
categories = ["no", "yes"]
missing = false
"""

MAPPING = """
[site]
id = "bench"
[source]
patient_key = "pid"
cohort = "patients"
memory_limit = "{memory_limit}"
[source.tables.patients]
path = "patients.parquet"
time = "enrolled"
[source.tables.labs]
path = "labs.csv"
time = "taken"
[source.index]
table = "patients"
[variables.age]
column = "age"
[variables.sex]
column = "sex"
values = {{ F = "female", M = "male" }}
[variables.bmi]
column = "bmi"
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
where = {{ test = "GLU" }}
unit = "mmol/L"
reduce = "max"
[variables.hb_mean]
table = "labs"
column = "value"
where = {{ test = "HB" }}
unit = "g/L"
reduce = "mean"
[variables.ldl_first]
table = "labs"
column = "value"
where = {{ test = "LDL" }}
unit = "mmol/L"
reduce = "first"
[variables.creatinine_max]
table = "labs"
column = "value"
where = {{ test = "CREA" }}
unit = "umol/L"
reduce = "max"
[variables.n_labs]
table = "labs"
reduce = "count"
[variables.hba1c_tested]
table = "labs"
where = {{ test = "HBA1C" }}
reduce = "any"
recorded = "yes"
not_recorded = "no"
"""

# test -> (typical value in its local unit, spread)
TESTS = {"CHOL": (5.2, 1.0), "GLU": (5.8, 1.5), "HB": (135.0, 15.0), "LDL": (3.2, 0.9), "CREA": (85.0, 25.0),
         "HBA1C": (40.0, 8.0)}


def generate(workdir: Path, rows: int, memory_limit: str = "1GB") -> dict[str, Any]:
    """Write the site's tables, dictionary and mapping into workdir (if not there yet)."""
    import duckdb

    workdir.mkdir(parents=True, exist_ok=True)
    patients = max(rows // 10, 1)
    (workdir / "dictionary.toml").write_text(DICTIONARY)
    (workdir / "mapping.toml").write_text(MAPPING.format(memory_limit=memory_limit))
    meta = workdir / "generated.json"
    if meta.exists() and json.loads(meta.read_text()).get("rows") == rows:
        return json.loads(meta.read_text())
    t0 = time.perf_counter()
    con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": str(workdir / "tmp")})
    con.execute("SELECT setseed(0.13)")
    con.execute(f"""COPY (SELECT 'P' || i AS pid, CAST(18 + (i * 7919) % 85 AS VARCHAR) AS age,
                       CASE WHEN i % 2 = 0 THEN 'F' ELSE 'M' END AS sex,
                       CAST(round(18 + random() * 20, 1) AS VARCHAR) AS bmi,
                       CAST(DATE '2020-01-01' + CAST(i % 366 AS INTEGER) AS VARCHAR) AS enrolled
                   FROM range({patients}) r(i)) TO '{workdir / "patients.parquet"}' (FORMAT parquet)""")
    cases = " ".join(f"WHEN {k} THEN '{t}'" for k, t in enumerate(TESTS))
    means = " ".join(f"WHEN {k} THEN {m}" for k, (m, _) in enumerate(TESTS.values()))
    sds = " ".join(f"WHEN {k} THEN {s}" for k, (_, s) in enumerate(TESTS.values()))
    con.execute(f"""COPY (SELECT 'P' || (hash(i) % {patients}) AS pid, CASE i % {len(TESTS)} {cases} END AS test,
                       CAST(round(abs((CASE i % {len(TESTS)} {means} END) + (CASE i % {len(TESTS)} {sds} END)
                            * (random() + random() + random() - 1.5) * 2), 2) AS VARCHAR) AS value,
                       CAST(TIMESTAMP '2019-01-01' + INTERVAL (i % 1096) DAY + INTERVAL (i % 86400) SECOND AS VARCHAR)
                            AS taken
                   FROM range({rows}) r(i)) TO '{workdir / "labs.csv"}' (HEADER, DELIMITER ',')""")
    con.close()
    info = {"rows": rows, "patients": patients, "labs_csv_bytes": (workdir / "labs.csv").stat().st_size,
            "generate_s": round(time.perf_counter() - t0, 1)}
    meta.write_text(json.dumps(info))
    return info


def measure(workdir: Path) -> dict[str, Any]:
    """In this process: start a guard on the generated site and answer a 100-marginal plan."""
    from ...client.config import load_site_config
    from ...client.guard import SiteGuard
    from ...common.dictionary import load_dictionary
    from ...common.keys import load_signing_key, new_signing_key
    from ...protos import guard_pb2 as pb
    from ...server.measure.planner import sign_plan
    from ..local import write_site_config

    t0 = time.perf_counter()
    keys = workdir / "keys"
    if not (keys / "site.key").exists():
        keys.mkdir(mode=0o700, exist_ok=True)
        new_signing_key(keys, "site")
        new_signing_key(keys, "coordinator")
    state = Path(tempfile.mkdtemp(prefix="state-", dir=workdir))
    cfg = write_site_config(workdir / "site.toml", "bench", workdir / "dictionary.toml", workdir / "mapping.toml", state,
                            "127.0.0.1:0", 10.0, 1e-6, keys / "site.key", [keys / "coordinator.pub"])
    guard = SiteGuard(load_site_config(cfg))
    t_load = time.perf_counter() - t0
    d = load_dictionary(workdir / "dictionary.toml")
    names = d.names
    sets = ([(n,) for n in names] + list(itertools.combinations(names, 2))
            + list(itertools.combinations(names, 3))[:45])
    plan = pb.QueryPlan(plan_id=f"bench-{time.time_ns()}", dictionary_hash=d.hash, coordinator="bench",
                        purpose="bench source", expires_at=int(time.time() + 3600),
                        marginals=[pb.MarginalQuery(variables=list(s), rho=0.001) for s in sets],
                        addressees=[pb.Addressee(site="bench", signer=guard.fingerprint)])
    t1 = time.perf_counter()
    signed = guard.answer(sign_plan(plan, load_signing_key(keys / "coordinator.key")))
    t_plan = time.perf_counter() - t1
    summary = pb.Summary.FromString(signed.summary)
    receipt = pb.BudgetReceipt.FromString(summary.receipt)
    return {"records": guard._table.n_rows, "source_rows": guard.validation.source_rows,
            "unit": receipt.unit, "rows_per_patient": receipt.rows_per_patient,
            "marginals": len(summary.marginals), "cells": sum(len(m.counts) for m in summary.marginals),
            "rho_debited": receipt.rho_debited, "load_reduce_s": round(t_load, 1), "plan_s": round(t_plan, 1),
            "total_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "notes": guard.validation.notes}


def run(rows: int, workdir: Path, memory_limit: str = "1GB") -> dict[str, Any]:
    info = generate(workdir, rows, memory_limit)
    out = subprocess.run([sys.executable, "-m", "ppsehr.deploy.bench.source", "--measure", str(workdir)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{out.stderr[-4000:]}")
    return {"generated": info, "memory_limit": memory_limit, "cpus": os.cpu_count(),
            **json.loads(out.stdout.strip().splitlines()[-1])}


def add_source_arguments(p) -> None:
    p.add_argument("--rows", type=int, default=10_000_000, help="lab rows (patients: rows / 10; default 10,000,000)")
    p.add_argument("--dir", help="work directory for the generated site (default: a temporary directory, removed)")
    p.add_argument("--memory-limit", default="1GB", help="DuckDB memory limit of the site source (default 1GB)")
    p.add_argument("--json", action="store_true")


def run_source_cli(args) -> int:
    import shutil

    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ppsehr-bench-source-"))
    try:
        result = run(args.rows, workdir.resolve(), args.memory_limit)
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    g = result["generated"]
    print(f"{result['source_rows']:,} source rows ({g['rows']:,} lab rows in CSV, {g['patients']:,} patients in Parquet) "
          f"-> {result['records']:,} patient records (unit {result['unit']})")
    print(f"load + join + reduce {result['load_reduce_s']} s; {result['marginals']}-marginal plan {result['plan_s']} s "
          f"({result['cells']:,} noisy cells); total {result['total_s']} s wall, {result['cpu_s']} s CPU")
    print(f"peak RSS {result['peak_rss_mib']:,} MiB (DuckDB memory_limit {result['memory_limit']}, {result['cpus']} CPUs)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(Path(sys.argv[2]))))
