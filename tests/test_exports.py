"""Release exports: FHIR R4 validated by a FHIR library, OMOP CDM tables read back, Parquet round trip."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fhirclient.models.condition import Condition
from fhirclient.models.encounter import Encounter
from fhirclient.models.fhirabstractbase import FHIRValidationError
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient

from ppsehr.common.dictionary import MISSING, parse_dictionary
from ppsehr.common.errors import ReleaseError
from ppsehr.server.release.exports import INDEX_DATE, OMOP_COLUMNS, export_files, synthetic_id
from ppsehr.server.model.records import decode, to_csv

R4 = {"Patient": Patient, "Encounter": Encounter, "Observation": Observation, "Condition": Condition}
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
RELEASE = "demo-2025-01-01T00:00:00Z"  # ':' is not allowed in FHIR ids: must be mapped away


@pytest.fixture(scope="module")
def records(dictionary):
    """Decoded synthetic records with every cell (missing included) drawn at random."""
    rng = np.random.default_rng(7)
    samples = np.stack([rng.integers(0, v.size, 150) for v in dictionary.variables.values()], axis=1)
    return decode(samples, dictionary, rng)


@pytest.fixture(scope="module")
def files(dictionary, records):
    return export_files(dictionary, records, RELEASE)


def ndjson(files, kind):
    return [json.loads(line) for line in files[f"fhir/{kind}.ndjson"].decode().splitlines()]


def omop(files, table):
    text = files[f"omop/{table}.csv"].decode()
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == OMOP_COLUMNS[table]
    return list(reader)


def test_every_fhir_resource_validates_as_r4(files, records, dictionary):
    n = len(records["age"])
    seen_ids = set()
    for kind, model in R4.items():
        for res in ndjson(files, kind):
            model(res, strict=True)  # FHIR R4 (4.0.1) structure, types, cardinality, formats
            assert res["resourceType"] == kind and FHIR_ID.match(res["id"]) and res["id"].startswith("synthetic-")
            assert res["id"] not in seen_ids
            seen_ids.add(res["id"])
            assert res["meta"]["tag"][0]["code"] == "HTEST"
    # Required bindings the model classes do not check.
    patients = ndjson(files, "Patient")
    assert len(patients) == n and {p["gender"] for p in patients} <= {"male", "female", "other", "unknown"}
    assert all(o["status"] == "final" for o in ndjson(files, "Observation"))
    assert all(e["status"] == "finished" and e["class"]["code"] == "AMB" for e in ndjson(files, "Encounter"))
    assert all(c["clinicalStatus"]["coding"][0]["code"] == "active" for c in ndjson(files, "Condition"))
    # Every reference resolves inside the export.
    for kind in ("Encounter", "Observation", "Condition"):
        for res in ndjson(files, kind):
            for key in ("subject", "encounter"):
                if key in res:
                    assert res[key]["reference"].split("/", 1)[1] in seen_ids


def test_fhir_content_follows_the_records_and_codes(files, records, dictionary):
    patients = ndjson(files, "Patient")
    for i, p in enumerate(patients):
        assert p["id"] == synthetic_id(RELEASE, i + 1)
        assert p["birthDate"] == str(int(INDEX_DATE[:4]) - int(records["age"][i]))
        assert p["gender"] == records["sex"][i]
    obs = ndjson(files, "Observation")
    chol = [o for o in obs if o["code"].get("coding") == [{"system": "http://loinc.org", "code": "2093-3"}]]
    assert [o["valueQuantity"]["value"] for o in chol] == [int(v) for v in records["chol"] if v]
    assert {o["valueQuantity"]["code"] for o in chol} == {"mg/dL"}
    uncoded = [o for o in obs if o["code"] == {"text": "fbs"}]
    assert [o["valueCodeableConcept"]["text"] for o in uncoded] == [v for v in records["fbs"] if v]
    conditions = ndjson(files, "Condition")
    cad = [c for c in conditions if c["code"]["text"] == "heart_disease=present"]
    assert len(cad) == records["heart_disease"].count("present") > 0
    assert {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I25.10"} in cad[0]["code"]["coding"]
    # "asymptomatic" chest pain and absent disease are uncoded: no Condition for them
    assert len(conditions) == len(cad) + sum(v in ("typical_angina", "atypical_angina", "non_anginal_pain")
                                             for v in records["cp"])


def test_fhir_validator_rejects_broken_resources(files):
    obs = ndjson(files, "Observation")[0]
    del obs["status"]
    with pytest.raises(FHIRValidationError):
        Observation(obs, strict=True)
    patient = dict(ndjson(files, "Patient")[0], birthDate="1960-13-45")
    with pytest.raises(FHIRValidationError):
        Patient(patient, strict=True)


def test_omop_tables_load_back_with_referential_integrity(files, records, dictionary):
    n = len(records["age"])
    person = omop(files, "person")
    ids = [int(p["person_id"]) for p in person]
    assert ids == list(range(1, n + 1))
    assert all(p["person_source_value"].startswith("synthetic-") for p in person)
    sex = {"female": "8532", "male": "8507"}
    assert [p["gender_concept_id"] for p in person] == [sex[s] for s in records["sex"]]
    periods = {int(r["person_id"]): r for r in omop(files, "observation_period")}
    visits = {int(r["visit_occurrence_id"]): int(r["person_id"]) for r in omop(files, "visit_occurrence")}
    assert set(periods) == set(ids) and set(visits.values()) == set(ids)
    for p in person:
        period = periods[int(p["person_id"])]
        assert period["observation_period_start_date"] <= period["observation_period_end_date"]
        assert int(p["year_of_birth"]) <= int(period["observation_period_start_date"][:4])
    tables = {t: omop(files, t) for t in ("measurement", "observation", "condition_occurrence")}
    for table, rows in tables.items():
        date = "condition_start_date" if table == "condition_occurrence" else f"{table}_date"
        key = f"{table}_id" if table != "condition_occurrence" else "condition_occurrence_id"
        assert [int(r[key]) for r in rows] == list(range(1, len(rows) + 1))  # primary keys unique
        for r in rows:
            pid = int(r["person_id"])
            assert pid in periods and visits[int(r["visit_occurrence_id"])] == pid
            period = periods[pid]
            assert period["observation_period_start_date"] <= r[date] <= period["observation_period_end_date"]
    # Concept ids come from the dictionary where it maps, 0 where it does not.
    meas = tables["measurement"]
    for name in ("trestbps", "chol", "thalach"):
        var = dictionary[name]
        rows = [r for r in meas if r["measurement_source_value"] == name]
        assert len(rows) == sum(1 for v in records[name] if v)
        assert {int(r["measurement_concept_id"]) for r in rows} == {var.codes["omop_concept_id"]}
        assert {int(r["unit_concept_id"]) for r in rows} == {var.codes["unit_concept_id"]}
        assert [r["value_as_number"] for r in rows] == [v for v in records[name] if v]
    assert {r["measurement_concept_id"] for r in meas if r["measurement_source_value"] == "oldpeak"} == {"0"}
    cond = tables["condition_occurrence"]
    cad = [r for r in cond if r["condition_source_value"] == "heart_disease=present"]
    assert cad and {r["condition_concept_id"] for r in cad} == {"317576"}
    assert {r["condition_concept_id"] for r in cond if r["condition_source_value"].startswith("cp=")} == {"0"}
    obs = tables["observation"]
    assert [r["value_as_string"] for r in obs if r["observation_source_value"] == "thal"] == [v for v in records["thal"] if v]
    assert "SYNTHETIC" in omop(files, "cdm_source")[0]["source_description"]


def test_parquet_round_trips_the_csv_records(files, records, dictionary):
    table = pq.read_table(pa.BufferReader(files["records.parquet"]))
    assert table.schema.metadata[b"ppsehr.dictionary_hash"].decode() == dictionary.hash
    rows = list(csv.DictReader(io.StringIO(to_csv(records).decode())))
    assert table.num_rows == len(rows) and table.column_names == dictionary.names
    for name, var in dictionary.variables.items():
        col = table[name]
        values = col.to_pylist()
        if var.type == "numeric":
            assert col.type == pa.float64()
            assert values == [float(r[name]) if r[name] else None for r in rows]
            assert table.schema.field(name).metadata[b"unit"].decode() == var.unit
        else:
            assert pa.types.is_dictionary(col.type)
            assert col.chunk(0).dictionary.to_pylist() == [c for c in var.cells if c != MISSING]
            assert values == [r[name] or None for r in rows]


def test_out_of_range_and_other_cells(tmp_path):
    d = parse_dictionary({"dictionary": {"name": "t", "version": "1"}, "variables": {
        "x": {"type": "numeric", "bins": [0, 10], "out_of_range": "cell", "unit": "kg",
              "codes": {"loinc": "29463-7", "unit_concept_id": 9529}},
        "y": {"type": "categorical", "categories": ["a"], "other": True}}})
    cols = {"x": ["5", "out_of_range", ""], "y": ["a", "other", ""]}
    files = export_files(d, cols, "r1")
    table = pq.read_table(pa.BufferReader(files["records.parquet"]))
    assert table["x"].to_pylist() == [5.0, None, None] and table["y"].to_pylist() == ["a", "other", None]
    assert len(ndjson(files, "Observation")) == 3  # x=5, y=a, y=other
    with pytest.raises(ReleaseError, match="'z' is not a cell"):
        export_files(d, {"x": ["1"], "y": ["z"]}, "r1")
    with pytest.raises(ReleaseError, match="not a number"):
        export_files(d, {"x": ["heavy"], "y": ["a"]}, "r1")


def test_formats_narrow_the_export(dictionary, records):
    assert export_files(dictionary, records, "r", {"csv"}) == {}
    assert set(export_files(dictionary, records, "r", {"parquet"})) == {"records.parquet"}
    assert all(k.startswith("omop/") for k in export_files(dictionary, records, "r", {"omop"}))
    with pytest.raises(ReleaseError, match="unknown export format"):
        export_files(dictionary, records, "r", {"xlsx"})
    with pytest.raises(ReleaseError, match="columns"):
        export_files(dictionary, {"age": records["age"]}, "r")


def test_synthetic_ids_are_valid_and_plain():
    assert synthetic_id("demo 2025/01:01", 3) == "synthetic-demo-2025-01-01-3"
    long = synthetic_id("x" * 200, 123456, "o12")
    assert FHIR_ID.match(long) and long.startswith("synthetic-x") and long.endswith("-123456-o12")


def test_the_declared_encounter_type_reaches_fhir_and_omop(dictionary, records):
    """ICU stays are exported as intensive care, not outpatient visits; the dictionary says which."""
    import dataclasses

    from ppsehr.common.dictionary import load_dictionary, parse_dictionary
    from ppsehr.common.errors import DictionaryError

    assert dictionary.encounter == "outpatient"
    icu = dataclasses.replace(dictionary, encounter="intensive_care")
    files = export_files(icu, records, RELEASE, {"fhir", "omop"})
    assert {e["class"]["code"] for e in ndjson(files, "Encounter")} == {"ACUTE"}
    assert {v["visit_concept_id"] for v in omop(files, "visit_occurrence")} == {"32037"}
    content = dict(dictionary.content, dictionary=dict(dictionary.content["dictionary"], encounter="icu"))
    with pytest.raises(DictionaryError, match=r"dictionary.encounter must be one of .*'intensive_care'.*got 'icu'"):
        parse_dictionary(content, "d.toml")
    content["dictionary"]["encounter"] = "inpatient"
    assert parse_dictionary(content, "d.toml").encounter == "inpatient"
    assert load_dictionary(dictionary.source).encounter == "outpatient"
