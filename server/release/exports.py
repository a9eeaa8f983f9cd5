"""Exports of a release for the health-data ecosystem: Parquet, FHIR R4 bulk NDJSON, OMOP CDM v5.4.

Every export is post-processing of the synthetic records (the decoded columns that also become
records.csv); nothing here sees site data. Row i of the records is synthetic person i + 1:

- `records.parquet`: the records, typed. Numeric variables are float64, categorical ones
  dictionary-encoded strings whose dictionary lists every declared category; missing (and a
  numeric `out_of_range` cell, which has no number) is null. Column metadata carries unit,
  description and codes; schema metadata the dictionary's name, version and hash.
- `fhir/<Resource>.ndjson` (FHIR R4 bulk-data format): one Patient and one Encounter (the
  examination) per record; an Observation per recorded measurement/observation variable; a
  Condition per condition variable whose category has codes. Ids read `synthetic-<release>-<n>`
  and every resource is tagged HTEST ("test health data").
- `omop/<table>.csv` (OMOP CDM v5.4 column order): person, observation_period, visit_occurrence,
  measurement, observation, condition_occurrence and cdm_source (which says the data are
  synthetic). Concept ids come from the dictionary's codes; 0 where it has none, with the
  variable and value kept in the *_source_value columns.

Synthetic records have no dates: every record's examination is on the nominal INDEX_DATE and
year of birth is that year minus the age (the OHDSI convention age = index year - year_of_birth).
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any, Iterable

from ...common.dictionary import ENCOUNTER_TYPES, MISSING, OUT_OF_RANGE, Dictionary, Variable
from ...common.units import parse_number
from ...common.errors import ReleaseError

FORMATS = ("csv", "parquet", "fhir", "omop")
INDEX_DATE = "2020-01-01"
EHR_TYPE_CONCEPT = 32817  # OMOP Type Concept "EHR"
OMOP_GENDER_FHIR = {8507: "male", 8532: "female"}
FHIR_GENDERS = ("male", "female", "other", "unknown")
SYSTEMS = {"loinc": "http://loinc.org", "snomed": "http://snomed.info/sct", "icd10cm": "http://hl7.org/fhir/sid/icd-10-cm"}
UCUM = "http://unitsofmeasure.org"
SYNTHETIC_TAG = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST",
                 "display": "test health data"}

OMOP_COLUMNS = {
    "person": ["person_id", "gender_concept_id", "year_of_birth", "month_of_birth", "day_of_birth", "birth_datetime",
               "race_concept_id", "ethnicity_concept_id", "location_id", "provider_id", "care_site_id",
               "person_source_value", "gender_source_value", "gender_source_concept_id", "race_source_value",
               "race_source_concept_id", "ethnicity_source_value", "ethnicity_source_concept_id"],
    "observation_period": ["observation_period_id", "person_id", "observation_period_start_date",
                           "observation_period_end_date", "period_type_concept_id"],
    "visit_occurrence": ["visit_occurrence_id", "person_id", "visit_concept_id", "visit_start_date",
                         "visit_start_datetime", "visit_end_date", "visit_end_datetime", "visit_type_concept_id",
                         "provider_id", "care_site_id", "visit_source_value", "visit_source_concept_id",
                         "admitted_from_concept_id", "admitted_from_source_value", "discharged_to_concept_id",
                         "discharged_to_source_value", "preceding_visit_occurrence_id"],
    "measurement": ["measurement_id", "person_id", "measurement_concept_id", "measurement_date",
                    "measurement_datetime", "measurement_time", "measurement_type_concept_id", "operator_concept_id",
                    "value_as_number", "value_as_concept_id", "unit_concept_id", "range_low", "range_high",
                    "provider_id", "visit_occurrence_id", "visit_detail_id", "measurement_source_value",
                    "measurement_source_concept_id", "unit_source_value", "unit_source_concept_id",
                    "value_source_value", "measurement_event_id", "meas_event_field_concept_id"],
    "observation": ["observation_id", "person_id", "observation_concept_id", "observation_date",
                    "observation_datetime", "observation_type_concept_id", "value_as_number", "value_as_string",
                    "value_as_concept_id", "qualifier_concept_id", "unit_concept_id", "provider_id",
                    "visit_occurrence_id", "visit_detail_id", "observation_source_value",
                    "observation_source_concept_id", "unit_source_value", "qualifier_source_value",
                    "value_source_value", "observation_event_id", "obs_event_field_concept_id"],
    "condition_occurrence": ["condition_occurrence_id", "person_id", "condition_concept_id", "condition_start_date",
                             "condition_start_datetime", "condition_end_date", "condition_end_datetime",
                             "condition_type_concept_id", "condition_status_concept_id", "stop_reason",
                             "provider_id", "visit_occurrence_id", "visit_detail_id", "condition_source_value",
                             "condition_source_concept_id", "condition_status_source_value"],
    "cdm_source": ["cdm_source_name", "cdm_source_abbreviation", "cdm_holder", "source_description",
                   "source_documentation_reference", "cdm_etl_reference", "source_release_date",
                   "cdm_release_date", "cdm_version", "cdm_version_concept_id", "vocabulary_version"],
}


def export_files(dictionary: Dictionary, columns: dict[str, list[str]], release_id: str,
                 formats: set[str] | None = None) -> dict[str, bytes]:
    """Release files (relative path -> bytes) for the requested formats (default: all).

    `columns` are the decoded records (server/records.py::decode). "csv" is accepted and yields
    nothing here: records.csv comes from server/records.py::to_csv.
    """
    formats = set(FORMATS) if formats is None else set(formats)
    unknown = sorted(formats - set(FORMATS))
    if unknown:
        raise ReleaseError(f"unknown export format(s) {unknown}; known: {list(FORMATS)}")
    records = _Records(dictionary, columns, release_id)
    out: dict[str, bytes] = {}
    if "parquet" in formats:
        out["records.parquet"] = records.parquet()
    if "fhir" in formats:
        out.update(records.fhir())
    if "omop" in formats:
        out.update(records.omop())
    return out


def synthetic_id(release_id: str, n: int, suffix: str = "") -> str:
    """A FHIR-valid id (at most 64 of [A-Za-z0-9-.]) that says what it is: synthetic-<release>-<n>[-suffix]."""
    tail = f"-{n}" + (f"-{suffix}" if suffix else "")
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", release_id).strip("-.") or "release"
    return f"synthetic-{slug[:64 - len('synthetic-') - len(tail)]}{tail}"


class _Records:
    """The decoded records, checked against the dictionary, with typed accessors for the exporters."""

    def __init__(self, dictionary: Dictionary, columns: dict[str, list[str]], release_id: str):
        if list(columns) != dictionary.names:
            raise ReleaseError(f"records have columns {list(columns)}, dictionary {dictionary.name} has {dictionary.names}")
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ReleaseError(f"record columns differ in length: {sorted(lengths)}")
        self.d, self.release_id = dictionary, release_id
        self.n = lengths.pop() if lengths else 0
        self.values: dict[str, list[Any]] = {name: self._parse(dictionary[name], col) for name, col in columns.items()}
        self.raw = columns

    @staticmethod
    def _parse(var: Variable, col: list[str]) -> list[Any]:
        """Numbers (float) or category labels; None for missing and out-of-range."""
        out: list[Any] = []
        cells = set(var.cells) - {MISSING}
        for i, s in enumerate(col):
            if s == "" or s == MISSING or (var.type == "numeric" and s == OUT_OF_RANGE):
                out.append(None)
            elif var.type == "numeric":
                try:
                    out.append(parse_number(s))
                except ValueError as e:
                    raise ReleaseError(f"record {i + 1}, variable {var.name!r}: {e}") from None
            elif s in cells:
                out.append(s)
            else:
                raise ReleaseError(f"record {i + 1}, variable {var.name!r}: {s!r} is not a cell of the dictionary")
        return out

    def _holder(self, domain: str) -> str | None:
        return next((n for n, v in self.d.variables.items() if v.codes.get("domain") == domain), None)

    def _birth_year(self, i: int) -> int | None:
        age = self._holder("age")
        value = self.values[age][i] if age else None
        return None if value is None else int(INDEX_DATE[:4]) - int(round(value))

    # ----------------------------------------------------------------------------- Parquet
    def parquet(self) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays, fields = [], []
        for name, var in self.d.variables.items():
            meta = {"description": var.description, "tier": str(var.tier), "codes": json.dumps(var.codes, sort_keys=True)}
            if var.type == "numeric":
                arrays.append(pa.array(self.values[name], type=pa.float64()))
                meta["unit"] = var.unit
                fields.append(pa.field(name, pa.float64(), metadata=meta))
            else:
                labels = [c for c in var.cells if c != MISSING]
                index = {c: k for k, c in enumerate(labels)}
                codes = pa.array([None if v is None else index[v] for v in self.values[name]], type=pa.int32())
                arrays.append(pa.DictionaryArray.from_arrays(codes, pa.array(labels, type=pa.string())))
                fields.append(pa.field(name, pa.dictionary(pa.int32(), pa.string()), metadata=meta))
        schema = pa.schema(fields, metadata={"ppsehr.dictionary": self.d.name, "ppsehr.dictionary_version": self.d.version,
                                             "ppsehr.dictionary_hash": self.d.hash, "ppsehr.release_id": self.release_id,
                                             "ppsehr.synthetic": "true"})
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), buf)
        return buf.getvalue()

    # ----------------------------------------------------------------------------- FHIR R4
    def fhir(self) -> dict[str, bytes]:
        res: dict[str, list[dict[str, Any]]] = {"Patient": [], "Encounter": [], "Observation": [], "Condition": []}
        encounter_class, encounter_display, _ = ENCOUNTER_TYPES[self.d.encounter]
        gender = self._holder("gender")
        meta = {"tag": [SYNTHETIC_TAG]}
        for i in range(self.n):
            pid, eid = synthetic_id(self.release_id, i + 1), synthetic_id(self.release_id, i + 1, "e")
            patient: dict[str, Any] = {"resourceType": "Patient", "id": pid, "meta": meta}
            if gender and self.values[gender][i] is not None:
                patient["gender"] = _fhir_gender(self.d[gender], self.values[gender][i])
            year = self._birth_year(i)
            if year is not None:
                patient["birthDate"] = f"{year:04d}"
            res["Patient"].append(patient)
            subject, encounter = {"reference": f"Patient/{pid}"}, {"reference": f"Encounter/{eid}"}
            res["Encounter"].append({
                "resourceType": "Encounter", "id": eid, "meta": meta, "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": encounter_class,
                          "display": encounter_display},
                "subject": subject, "period": {"start": INDEX_DATE, "end": INDEX_DATE}})
            for j, (name, var) in enumerate(self.d.variables.items()):
                value = self.values[name][i]
                if value is None or var.domain in ("age", "gender"):
                    continue
                rid = synthetic_id(self.release_id, i + 1, f"{'c' if var.domain == 'condition' else 'o'}{j}")
                if var.domain == "condition":
                    codes = var.category_codes(value)
                    if not codes:
                        continue  # an uncoded category of a condition variable records no condition
                    res["Condition"].append({
                        "resourceType": "Condition", "id": rid, "meta": meta,
                        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                       "code": "active"}]},
                        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                                           "code": "confirmed"}]},
                        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                                  "code": "encounter-diagnosis"}]}],
                        "code": _concept(codes, f"{name}={value}"),
                        "subject": subject, "encounter": encounter, "recordedDate": INDEX_DATE})
                    continue
                obs: dict[str, Any] = {"resourceType": "Observation", "id": rid, "meta": meta, "status": "final",
                                       "code": _concept(var.codes, name), "subject": subject, "encounter": encounter,
                                       "effectiveDateTime": INDEX_DATE}
                if var.type == "numeric":
                    obs["valueQuantity"] = {"value": _number(value, var.precision)}
                    if var.unit:
                        obs["valueQuantity"].update(unit=var.unit, system=UCUM, code=var.unit)
                else:
                    obs["valueCodeableConcept"] = _concept(var.category_codes(value), value)
                res["Observation"].append(obs)
        return {f"fhir/{kind}.ndjson": _ndjson(items) for kind, items in res.items() if items}

    # ----------------------------------------------------------------------------- OMOP CDM v5.4
    def omop(self) -> dict[str, bytes]:
        rows: dict[str, list[dict[str, Any]]] = {t: [] for t in OMOP_COLUMNS}
        gender = self._holder("gender")
        for i in range(self.n):
            pid = i + 1
            g = self.values[gender][i] if gender else None
            rows["person"].append({
                "person_id": pid, "year_of_birth": self._birth_year(i),
                "gender_concept_id": self.d[gender].category_codes(g).get("omop_concept_id", 0) if g else 0,
                "race_concept_id": 0, "ethnicity_concept_id": 0, "gender_source_value": g,
                "person_source_value": synthetic_id(self.release_id, pid)})
            rows["observation_period"].append({
                "observation_period_id": pid, "person_id": pid, "observation_period_start_date": INDEX_DATE,
                "observation_period_end_date": INDEX_DATE, "period_type_concept_id": EHR_TYPE_CONCEPT})
            rows["visit_occurrence"].append({
                "visit_occurrence_id": pid, "person_id": pid, "visit_concept_id": ENCOUNTER_TYPES[self.d.encounter][2],
                "visit_start_date": INDEX_DATE, "visit_end_date": INDEX_DATE, "visit_type_concept_id": EHR_TYPE_CONCEPT,
                "visit_source_value": f"synthetic {self.d.encounter.replace('_', ' ')} encounter"})
            for name, var in self.d.variables.items():
                value = self.values[name][i]
                if value is None or var.domain in ("age", "gender"):
                    continue
                concept = var.codes.get("omop_concept_id", 0)
                common = {"person_id": pid, "visit_occurrence_id": pid}
                if var.domain == "condition":
                    codes = var.category_codes(value)
                    if not codes:
                        continue
                    rows["condition_occurrence"].append(dict(
                        common, condition_occurrence_id=len(rows["condition_occurrence"]) + 1,
                        condition_concept_id=codes.get("omop_concept_id", 0), condition_start_date=INDEX_DATE,
                        condition_type_concept_id=EHR_TYPE_CONCEPT, condition_source_value=f"{name}={value}"[:50]))
                    continue
                table = "measurement" if var.domain == "measurement" else "observation"
                row = dict(common, **{f"{table}_id": len(rows[table]) + 1, f"{table}_concept_id": concept,
                                      f"{table}_date": INDEX_DATE, f"{table}_type_concept_id": EHR_TYPE_CONCEPT,
                                      f"{table}_source_value": name[:50], "value_source_value": self.raw[name][i][:50]})
                if var.type == "numeric":
                    row.update(value_as_number=self.raw[name][i], unit_concept_id=var.codes.get("unit_concept_id", 0),
                               unit_source_value=var.unit[:50] or None)
                else:
                    row["value_as_concept_id"] = var.category_codes(value).get("omop_concept_id", 0)
                    if table == "observation":
                        row["value_as_string"] = value[:60]
                rows[table].append(row)
        rows["cdm_source"].append({
            "cdm_source_name": f"ppsehr synthetic release {self.release_id}"[:255], "cdm_source_abbreviation": "ppsehr-synthetic",
            "cdm_holder": "ppsehr consortium coordinator",
            "source_description": (f"SYNTHETIC records generated under differential privacy from dictionary "
                                   f"{self.d.name} {self.d.version} ({self.d.hash}); no row is a real patient. "
                                   f"Dates are nominal ({INDEX_DATE})."),
            "source_release_date": INDEX_DATE, "cdm_release_date": INDEX_DATE, "cdm_version": "v5.4",
            "cdm_version_concept_id": 0, "vocabulary_version": f"{self.d.name} {self.d.version}"[:20]})
        return {f"omop/{t}.csv": _csv(OMOP_COLUMNS[t], r) for t, r in rows.items()}


def _fhir_gender(var: Variable, label: str) -> str:
    concept = var.category_codes(label).get("omop_concept_id")
    if concept in OMOP_GENDER_FHIR:
        return OMOP_GENDER_FHIR[concept]
    return label if label in FHIR_GENDERS else "unknown"


def _codings(codes: dict[str, Any]) -> list[dict[str, str]]:
    return [{"system": SYSTEMS[k], "code": codes[k]} for k in ("loinc", "snomed", "icd10cm") if k in codes]


def _concept(codes: dict[str, Any], text: str) -> dict[str, Any]:
    codings = _codings(codes)
    return {"coding": codings, "text": text} if codings else {"text": text}


def _number(x: float, precision: int) -> float | int:
    return int(round(x)) if precision == 0 else round(x, precision)


def _ndjson(items: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(item, separators=(",", ":"), ensure_ascii=False) + "\n" for item in items).encode()


def _csv(header: list[str], rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r[c] for c in header])
    return buf.getvalue().encode()
