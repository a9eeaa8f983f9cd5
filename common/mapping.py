"""Site mappings: how one hospital's local tables become harmonized, integer-encoded patient records.

A mapping is a TOML file kept at the site (it may name local file paths and codes). Every key is
checked: an unknown key is an error naming the file, the key and the closest known key. The
privacy unit is the patient: every source names its patient key, and the rows of each patient
become one record by the rules the mapping declares (or at most `rows_per_patient` records).

    [site]
    id = "cleveland"
    [source]                                 # one table ...
    path = "data/processed.cleveland.data"   # relative to the mapping file
    format = "csv"                           # csv | tsv | parquet (default: from the extension) | omop (common/omop.py)
    patient_key = "row"                      # the patient-id column, or "row": each row is a distinct
                                             # patient, as the site admin attests (no id to check)
    header = false                           # csv/tsv: first line holds column names
    columns = ["age", "sex", ...]            # names when there is no header
    delimiter = ","                          # csv: ",", tsv: tab; any one character (";" with decimal = ",")
    encoding = "utf-8"                       # any Python codec name (latin-1, cp1252, utf-16, ...)
    decimal = "."                            # or "," for decimal commas (3,5 = 3.5)
    missing_values = ["?"]                   # local codes meaning "missing" in every column
    [variables.chol]
    column = "chol"
    missing_values = ["0"]                   # codes meaning "missing" in this column only
    unit = "mmol/L"                          # local unit; converted to the dictionary's unit (pint)
    # scale = 38.67, offset = 0.0            # or an explicit linear conversion
    [variables.sex]
    column = "sex"
    values = { "0" = "female", "1" = "male" }  # local code -> category, "missing" or "other"
    unmapped = "error"                       # or "missing" / "other": codes neither listed nor a category
    [variables.slope]
    absent = true                            # the site does not record it: every record is missing

or several tables joined by the patient key (docs/dictionary.md, "Patients and multi-table sources"):

    [source]
    patient_key = "patient_id"
    cohort = "patients"                      # its distinct keys are the patients (default: first table)
    [source.tables.patients]
    path = "patients.csv"
    [source.tables.labs]
    path = "labs.parquet"; key = "subject"; time = "taken_at"
    [source.index]                           # optional index event, for windows
    table = "admissions"; rule = "first"
    [variables.chol]
    table = "labs"; column = "value"; where = { test = ["2093-3"] }
    unit = "mmol/L"; reduce = "last"         # first | last | min | max | mean | count | any
    window_days = [-365, 0]                  # rows within this many days of the index event

Numeric-looking codes match by value ("1", "1.0" and " 1" are the same code). Empty fields are
missing. Loading (`common.source.load_site_table`) yields an EncodedTable (one int32 column of cell indices per
dictionary variable, one entry per patient record) and a ValidationReport that stays at the site:
it may quote local values.
"""

from __future__ import annotations

import codecs
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import cells as cell_groups
from . import omop
from . import privacy_unit
from .dictionary import MISSING, OTHER, OUT_OF_RANGE, Dictionary, Variable
from .codemap import VariableMapping, check_keys, check_target, norm_code
from .errors import MappingError, did_you_mean
from .units import conversion, parse_number, round_to

FORMATS = ("csv", "tsv", "parquet", "omop")  # omop: CDM tables, see common/omop.py
TABLE_FORMATS = ("csv", "tsv", "parquet", "database")
REDUCE_RULES = ("first", "last", "min", "max", "mean", "count", "any")
NUMERIC_RULES = ("first", "last", "min", "max", "mean", "count")
CATEGORICAL_RULES = ("first", "last", "any")
KEEP_RULES = ("latest", "earliest", "sample")
MAX_ROWS_PER_PATIENT = 100
DATABASE_SUFFIXES = {".duckdb": "duckdb", ".ddb": "duckdb", ".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite"}

_TOP_KEYS = ("site", "source", "variables")
_SITE_KEYS = ("id", "name", "description")
_READ_KEYS = ("format", "delimiter", "header", "columns", "missing_values", "encoding", "decimal")
_TABLE_KEYS = ("path", "table", "key", "time") + _READ_KEYS
_UNIT_KEYS = ("patient_key", "rows_per_patient", "keep", "seed", "index", "memory_limit")
_SOURCE_KEYS = ("path", "time", "cohort", "tables", "database") + _READ_KEYS + _UNIT_KEYS
_OMOP_SOURCE_KEYS = ("format", "path", "index_date", "patient_key", "memory_limit")
_INDEX_KEYS = ("table", "time", "rule", "where", "date")
_VAR_KEYS = ("column", "absent", "values", "missing_values", "unmapped", "unit", "scale", "offset", "table", "where",
             "reduce", "window_days", "recorded", "not_recorded")


@dataclass(frozen=True)
class TableSpec:
    name: str
    path: Path  # file, or the database holding `table`
    format: str  # csv | tsv | parquet | database
    key: str | None  # patient-key column; None: each row is a patient (patient_key = "row")
    time: str | None = None  # time column (first/last, windows, keep)
    table: str = ""  # database table name
    delimiter: str = ","
    header: bool = True
    columns: tuple[str, ...] = ()
    missing_values: frozenset[str] = frozenset({""})
    encoding: str = "utf-8"
    decimal: str = "."
    where: str = ""  # "file: source.tables.<name>", for messages

    @property
    def label(self) -> str:
        return f"{self.path}, table {self.table}" if self.format == "database" else str(self.path)


@dataclass(frozen=True)
class IndexEvent:
    table: str = ""
    time: str | None = None
    rule: str = "first"  # first | last
    where: tuple[tuple[str, tuple[str, ...]], ...] = ()
    date: str = ""  # a fixed index date instead


@dataclass(frozen=True)
class SiteMapping:
    site: str
    tables: dict[str, TableSpec]
    cohort: str  # table whose distinct keys (or rows, patient_key = "row") are the patients
    patient_key: str  # column name, or "row"
    rows_per_patient: int  # 1: one record per patient; k > 1: up to k rows of the cohort table each
    keep: str  # rows beyond k: latest | earliest (by the cohort table's time, then file order) | sample
    seed: int
    index: IndexEvent | None
    variables: dict[str, VariableMapping]
    source: str  # the mapping file
    format: str = "table"  # "table" | "omop"
    omop: Any = None  # omop.OmopSource when format = "omop"
    memory_limit: str = "1GB"
    omop_path: Path | None = None

    @property
    def path(self) -> Path:
        """The main data path: the cohort table's file, the database, or the OMOP CDM."""
        return self.omop_path if self.omop is not None else self.tables[self.cohort].path

    @property
    def data_paths(self) -> list[Path]:
        if self.omop is not None:
            return [self.omop_path]
        return list(dict.fromkeys(t.path for t in self.tables.values()))

    @property
    def unit(self) -> str:
        """The privacy unit this source gives (common/privacy_unit.py)."""
        if self.patient_key == "row":
            return privacy_unit.ATTESTED_ROW
        return privacy_unit.PATIENT if self.rows_per_patient == 1 else privacy_unit.PATIENT_ROWS


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MappingError(f"{path}: mapping file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MappingError(f"{path}: not valid TOML: {e}") from None


def load_mapping(path: str | Path, dictionary: Dictionary) -> SiteMapping:
    """Read a site mapping TOML file and check every key of it against the format and the dictionary."""
    path = Path(path)
    raw = _read_toml(path)
    where = str(path)
    check_keys(raw, _TOP_KEYS, where, "table")
    check_keys(raw.get("site", {}), _SITE_KEYS, f"{where}: [site]")
    site = raw.get("site", {}).get("id")
    if not site or not isinstance(site, str):
        raise MappingError(f"{where}: [site] needs an 'id'")
    src = raw.get("source")
    if not isinstance(src, dict):
        raise MappingError(f"{where}: needs a [source] table (the site's data and its patient key)")
    raw_vars = raw.get("variables", {})
    if not isinstance(raw_vars, dict):
        raise MappingError(f"{where}: [variables] must be a table of [variables.<name>] tables")
    for name in raw_vars:
        if name not in dictionary.variables:
            raise MappingError(f"{where}: variables.{name} is not in dictionary {dictionary.name} {dictionary.version}"
                               + did_you_mean(name, dictionary.variables))
    for name in dictionary.variables:
        if name not in raw_vars:
            raise MappingError(f"{where}: dictionary variable {name!r} is not mapped (map it, or declare absent = true)")
    if src.get("format") == "omop":
        return _load_omop(path, raw, src, site, dictionary)
    return _load_tables(path, raw, src, site, dictionary)


def _load_omop(path: Path, raw: dict, src: dict, site: str, dictionary: Dictionary) -> SiteMapping:
    where = str(path)
    check_keys(src, _OMOP_SOURCE_KEYS, f"{where}: [source] (format = \"omop\")")
    if src.get("patient_key", "person_id") != "person_id":
        raise MappingError(f"{where}: source.patient_key: an OMOP CDM's patients are person.person_id; remove the key "
                           "or set it to \"person_id\"")
    if not src.get("path"):
        raise MappingError(f"{where}: [source] needs a 'path'")
    data_path = (path.parent / src["path"]).resolve()
    vmaps, omop_vars = {}, {}
    for name, var in dictionary.variables.items():
        spec = raw["variables"][name]
        w = f"{where}: variables.{name}"
        if not isinstance(spec, dict):
            raise MappingError(f"{w}: must be a table")
        if spec.get("absent"):
            vmaps[name] = _parse_variable_mapping(spec, var, w, None)
            continue
        if "omop" not in spec:
            raise MappingError(f"{w}: with source.format = \"omop\", define it with omop = ... (see docs/dictionary.md) "
                               "or declare absent = true")
        omop_vars[name], vmaps[name] = omop.parse_variable(name, spec, var, w)
    source = omop.OmopSource(data_path, omop.parse_index_rule(src, where), omop_vars)
    return SiteMapping(site, {}, "", "person_id", 1, "latest", 0, None, vmaps, where, "omop", source,
                       _memory_limit(src, where), data_path)


def _memory_limit(src: dict, where: str) -> str:
    value = src.get("memory_limit", "1GB")
    if not isinstance(value, str) or not value.strip() or not value.strip()[0].isdigit():
        raise MappingError(f"{where}: source.memory_limit must be a size such as \"1GB\" or \"512MB\"")
    return value.strip()


def _load_tables(path: Path, raw: dict, src: dict, site: str, dictionary: Dictionary) -> SiteMapping:
    where = str(path)
    sw = f"{where}: [source]"
    check_keys(src, _SOURCE_KEYS, sw)
    key = src.get("patient_key")
    if not isinstance(key, str) or not key.strip():
        raise MappingError(f"{sw} needs patient_key: the column holding the patient id (every table names the patient "
                           "its row belongs to), or patient_key = \"row\" if each row is a distinct patient, as the site "
                           "admin attests (see docs/privacy.md)")
    key = key.strip()
    k = src.get("rows_per_patient", 1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_ROWS_PER_PATIENT:
        raise MappingError(f"{sw}: rows_per_patient must be an integer from 1 to {MAX_ROWS_PER_PATIENT}, got {k!r}")
    keep = src.get("keep", "latest")
    if keep not in KEEP_RULES:
        raise MappingError(f"{sw}: keep must be one of {KEEP_RULES}, got {keep!r}")
    seed = src.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise MappingError(f"{sw}: seed must be a non-negative integer")
    if keep == "sample" and "seed" not in src:
        raise MappingError(f"{sw}: keep = \"sample\" needs a seed (so the rows kept are the same at every start)")
    database = src.get("database")
    if database is not None and (not isinstance(database, str) or not database):
        raise MappingError(f"{sw}: database must be the path of the site's DuckDB or SQLite database file")
    db_path = (path.parent / database).resolve() if database else None
    if db_path is not None and db_path.suffix.lower() not in DATABASE_SUFFIXES:
        raise MappingError(f"{sw}: database {database!r}: use a DuckDB (.duckdb) or SQLite (.sqlite, .db) file")
    defaults = {k2: src[k2] for k2 in _READ_KEYS if k2 in src}
    if "tables" in src:
        if "path" in src or "columns" in src or "time" in src:
            raise MappingError(f"{sw}: with [source.tables.<name>], give path, columns and time in each table")
        tables_raw = src["tables"]
        if not isinstance(tables_raw, dict) or not tables_raw:
            raise MappingError(f"{sw}: tables must hold at least one [source.tables.<name>] table")
        tables = {}
        for name, spec in tables_raw.items():
            tables[name] = _parse_table(name, spec, defaults, key, path, db_path, f"{where}: source.tables.{name}")
    else:
        if db_path is not None:
            raise MappingError(f"{sw}: with a database, name its tables in [source.tables.<name>] (table = \"...\")")
        if not src.get("path"):
            raise MappingError(f"{sw} needs a 'path' (one table) or [source.tables.<name>] tables")
        spec = {k2: src[k2] for k2 in ("path", "time", "columns") if k2 in src}
        tables = {"main": _parse_table("main", spec, defaults, key, path, None, f"{where}: [source]")}
    cohort = src.get("cohort", next(iter(tables)))
    if cohort not in tables:
        raise MappingError(f"{sw}: cohort {cohort!r} is not one of its tables ({', '.join(tables)})")
    if key == "row":
        if len(tables) > 1:
            raise MappingError(f"{sw}: patient_key = \"row\" (each row a distinct patient) needs a single table: "
                               "tables can only be joined by a patient-key column")
        if k != 1:
            raise MappingError(f"{sw}: rows_per_patient = {k} needs a patient_key column to bound each patient's rows; "
                               "with patient_key = \"row\" every row is one patient")
    index = _parse_index(src.get("index"), tables, where) if "index" in src else None
    if index is not None and key == "row":
        raise MappingError(f"{sw}: an index event ([source.index]) needs a patient_key column: with patient_key = "
                           "\"row\" each row is one patient and there is nothing to window")
    vmaps = {}
    for name, var in dictionary.variables.items():
        vmaps[name] = _parse_variable_mapping(raw["variables"][name], var, f"{where}: variables.{name}", tables,
                                              default_table=cohort)
    records = cohort if k > 1 else None
    for name, vm in vmaps.items():
        w = vm.where_text
        if vm.absent:
            continue
        if key == "row" and (vm.reduce or vm.window_days):
            raise MappingError(f"{w}: with patient_key = \"row\" each row is one patient: there is nothing to reduce "
                               "(remove reduce/window_days, or name the patient-key column)")
        if vm.window_days is not None and index is None:
            raise MappingError(f"{w}: window_days needs an index event ([source.index])")
        if vm.window_days is not None and tables[vm.table].time is None:
            raise MappingError(f"{w}: window_days needs a time column on table {vm.table!r} (source.tables.{vm.table}.time)")
        if records is not None and vm.table == records and (vm.reduce or vm.window_days):
            raise MappingError(f"{w}: with rows_per_patient = {k} the rows of {records!r} are the records, so its "
                               "variables take each row's own value (remove reduce/window_days, or read it from "
                               "another table)")
    return SiteMapping(site, tables, cohort, key, k, keep, seed, index, vmaps, where,
                       memory_limit=_memory_limit(src, where))


def _parse_table(name: str, spec: Any, defaults: dict, key: str, mapping_path: Path, db_path: Path | None,
                 where: str) -> TableSpec:
    check_keys(spec, _TABLE_KEYS, where)
    spec = defaults | spec
    if "table" in spec:  # a table of the site's database
        if db_path is None:
            raise MappingError(f"{where}: table = ... names a database table; set source.database (or give path)")
        if "path" in spec:
            raise MappingError(f"{where}: give path (a file) or table (a table of source.database), not both")
        fmt, path, table = "database", db_path, spec["table"]
        if not isinstance(table, str) or not table:
            raise MappingError(f"{where}: table must name a table of the database")
    else:
        if not isinstance(spec.get("path"), str) or not spec["path"]:
            raise MappingError(f"{where}: needs a 'path' (a file)" + (" or table = \"<database table>\""
                                                                        if db_path is not None else ""))
        path = (mapping_path.parent / spec["path"]).resolve()
        fmt = spec.get("format") or {".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}.get(path.suffix.lower(), "csv")
        table = ""
        if fmt not in ("csv", "tsv", "parquet"):
            raise MappingError(f"{where}: format must be csv, tsv or parquet (or omop for the whole source), got {fmt!r}")
    delimiter = spec.get("delimiter", "\t" if fmt == "tsv" else ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\"\r\n":
        raise MappingError(f"{where}: delimiter must be one character (e.g. \",\", \";\", \"\\t\", \"|\"), got {delimiter!r}")
    decimal = spec.get("decimal", ".")
    if decimal not in (".", ","):
        raise MappingError(f"{where}: decimal must be \".\" or \",\", got {decimal!r}")
    if decimal == "," and delimiter == "," and fmt in ("csv", "tsv"):
        raise MappingError(f"{where}: decimal = \",\" needs another delimiter (e.g. delimiter = \";\")")
    encoding = spec.get("encoding", "utf-8")
    try:
        codecs.lookup(str(encoding))
    except LookupError:
        raise MappingError(f"{where}: encoding {encoding!r} is not a known text encoding (e.g. utf-8, latin-1, cp1252)") from None
    header = spec.get("header", True)
    if not isinstance(header, bool):
        raise MappingError(f"{where}: header must be true or false")
    columns = spec.get("columns", [])
    if not isinstance(columns, list) or not all(isinstance(c, str) and c for c in columns):
        raise MappingError(f"{where}: columns must be a list of column names")
    if fmt in ("csv", "tsv") and not header and not columns:
        raise MappingError(f"{where}: columns is required when header = false")
    tkey = spec.get("key", None if key == "row" else key)
    if key == "row" and "key" in spec:
        raise MappingError(f"{where}: key: patient_key = \"row\" means the table has no patient-key column")
    if tkey is not None and (not isinstance(tkey, str) or not tkey):
        raise MappingError(f"{where}: key must name the table's patient-key column")
    time = spec.get("time")
    if time is not None and (not isinstance(time, str) or not time):
        raise MappingError(f"{where}: time must name a date/time column")
    missing = spec.get("missing_values", [])
    if not isinstance(missing, list):
        raise MappingError(f"{where}: missing_values must be a list of codes")
    return TableSpec(name, path, fmt, tkey, time, table, delimiter, header, tuple(columns),
                     frozenset(norm_code(v) for v in missing) | {""}, str(encoding), decimal, where)


def _parse_where(raw: Any, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(raw, dict) or not raw:
        raise MappingError(f"{where}: must be a table of column = [codes] (a code ending in * matches by prefix)")
    out = []
    for column, codes in raw.items():
        codes = codes if isinstance(codes, list) else [codes]
        if not codes or not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in codes):
            raise MappingError(f"{where}.{column}: must be a code or a non-empty list of codes")
        out.append((column, tuple(str(c).strip() for c in codes)))
    return tuple(out)


def _parse_index(raw: Any, tables: dict[str, TableSpec], where: str) -> IndexEvent:
    w = f"{where}: source.index"
    check_keys(raw, _INDEX_KEYS, w)
    if "date" in raw:
        if set(raw) != {"date"}:
            raise MappingError(f"{w}: date = \"YYYY-MM-DD\" is a fixed index date; it takes no other keys")
        import datetime as dt

        try:
            dt.date.fromisoformat(str(raw["date"]))
        except ValueError:
            raise MappingError(f"{w}.date: must be a date YYYY-MM-DD, got {raw['date']!r}") from None
        return IndexEvent(date=str(raw["date"]))
    table = raw.get("table")
    if table not in tables:
        raise MappingError(f"{w}: table must be one of the source's tables ({', '.join(tables)}), got {table!r}")
    time = raw.get("time", tables[table].time)
    if not isinstance(time, str) or not time:
        raise MappingError(f"{w}: needs time = \"<column>\" (or a time column on table {table!r})")
    rule = raw.get("rule", "first")
    if rule not in ("first", "last"):
        raise MappingError(f"{w}.rule: must be \"first\" or \"last\" (the patient's earliest or latest such row)")
    return IndexEvent(table, time, rule, _parse_where(raw["where"], f"{w}.where") if "where" in raw else ())


def _parse_variable_mapping(spec: Any, var: Variable, where: str, tables: dict[str, TableSpec] | None,
                            default_table: str = "") -> VariableMapping:
    check_keys(spec, _VAR_KEYS, where)
    name = var.name
    if spec.get("absent"):
        if set(spec) != {"absent"}:
            raise MappingError(f"{where}: absent = true takes no other keys ({sorted(set(spec) - {'absent'})})")
        if not var.missing:
            raise MappingError(f"{where}: absent = true, but the dictionary declares no missing cell for it")
        return VariableMapping(column=None, absent=True, name=name, where_text=where)
    if "absent" in spec and spec["absent"] is not False:
        raise MappingError(f"{where}.absent: must be true or false")
    table = spec.get("table", default_table)
    if tables is not None and table not in tables:
        raise MappingError(f"{where}.table: {table!r} is not a table of the source"
                           + did_you_mean(table, tables, f"tables: {', '.join(tables)}"))
    reduce = spec.get("reduce")
    if reduce is not None:
        rules = NUMERIC_RULES if var.type == "numeric" else CATEGORICAL_RULES
        if reduce not in rules:
            raise MappingError(f"{where}.reduce: a {var.type} variable takes one of {rules}, got {reduce!r}")
    column = spec.get("column")
    if column is not None and (not isinstance(column, str) or not column):
        raise MappingError(f"{where}.column: must name a column")
    if column is None and reduce not in ("count", "any"):
        raise MappingError(f"{where}: needs 'column' (or absent = true)")
    recorded, not_recorded = spec.get("recorded"), spec.get("not_recorded")
    if reduce == "any":
        for key, label in (("recorded", recorded), ("not_recorded", not_recorded)):
            if not isinstance(label, str):
                raise MappingError(f"{where}: reduce = \"any\" needs recorded = \"<category>\" (patients with a matching "
                                   "row) and not_recorded = \"<category>\" (or \"missing\")")
            if label not in var.categories and not (key == "not_recorded" and label == MISSING and var.missing):
                check_target(label, key, var, f"{where}.{key}")
                raise MappingError(f"{where}.{key}: must be a category of {name!r} (categories: {list(var.categories)})")
        if "values" in spec or "unmapped" in spec:
            raise MappingError(f"{where}: reduce = \"any\" takes where = {{...}} to choose the rows, not values/unmapped")
    elif recorded is not None or not_recorded is not None:
        raise MappingError(f"{where}: recorded/not_recorded go with reduce = \"any\"")
    raw_values = spec.get("values", {})
    if not isinstance(raw_values, dict):
        raise MappingError(f"{where}.values: must be a table of local code = category")
    values = {}
    for code, label in raw_values.items():
        c = norm_code(code)
        if c in values and values[c] != label:
            raise MappingError(f"{where}.values: codes {code!r} and another one are the same code ({c!r}) mapped "
                               "to different categories")
        values[c] = check_target(label, code, var, f"{where}.values") if var.type == "categorical" else label
    if values and var.type != "categorical":
        raise MappingError(f"{where}.values: only categorical variables take a value map")
    unmapped = spec.get("unmapped", "error")
    if unmapped not in ("error", "missing", "other"):
        raise MappingError(f"{where}.unmapped: must be error, missing or other")
    if unmapped == "missing" and not var.missing:
        raise MappingError(f"{where}.unmapped = 'missing' needs a missing cell in the dictionary")
    if unmapped == "other" and not var.other:
        raise MappingError(f"{where}.unmapped = 'other' needs other = true in the dictionary")
    unit, scale, offset = spec.get("unit"), spec.get("scale"), spec.get("offset")
    if var.type == "numeric" and reduce != "count":
        if unit is not None and (scale is not None or offset is not None):
            raise MappingError(f"{where}: give unit, or scale/offset, not both")
        if offset is not None and scale is None:
            raise MappingError(f"{where}.offset: goes with scale (value * scale + offset)")
        if unit is not None:
            if not isinstance(unit, str) or not unit.strip():
                raise MappingError(f"{where}.unit: must be a unit code such as \"mg/dL\"")
            if not var.unit:
                raise MappingError(f"{where}.unit: the dictionary declares no unit for {name!r}; remove it")
            try:
                scale, offset = conversion(unit, var.unit, var.molar_mass)
            except MappingError as e:
                raise MappingError(f"{where}.unit: {e}") from None
        for k, x in (("scale", scale), ("offset", offset)):
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)):
                raise MappingError(f"{where}.{k}: must be a finite number")
        if scale is not None and scale == 0:
            raise MappingError(f"{where}.scale: must not be zero")
    elif unit is not None or scale is not None or offset is not None:
        raise MappingError(f"{where}: unit/scale/offset apply to numeric values only"
                           + (" (reduce = \"count\" counts rows)" if reduce == "count" else ""))
    missing_values = spec.get("missing_values", [])
    if not isinstance(missing_values, list):
        raise MappingError(f"{where}.missing_values: must be a list of codes")
    window = spec.get("window_days")
    if window is not None:
        if (not isinstance(window, list) or len(window) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in window)
                or window[0] > window[1]):
            raise MappingError(f"{where}.window_days: must be [from, to] in days from the index event, e.g. [-365, 0]")
        window = (float(window[0]), float(window[1]))
    return VariableMapping(column, False, values, frozenset(norm_code(v) for v in missing_values), unmapped, unit,
                           None if scale is None else float(scale), float(offset or 0.0), table,
                           _parse_where(spec["where"], f"{where}.where") if "where" in spec else (),
                           reduce, window, recorded or "", not_recorded or "", name, where)


@dataclass
class EncodedTable:
    """Harmonized site data: for each dictionary variable, the cell index of every record.

    `unit` and `rows_per_patient` say what a record is (common/privacy_unit.py): the guard charges
    a plan by the loss of one unit, and states both in its receipts."""

    columns: dict[str, np.ndarray]
    n_rows: int
    unit: str = ""
    rows_per_patient: int = 1

    def cell_index(self, names: Iterable[str], shape: tuple[int, ...], groups: Sequence | None = None) -> np.ndarray:
        """Flat index of each row's cell in the joint domain of `names` (row-major), with the
        variables' cells summed into `groups` (see common/cells.py; shape is then the grouped shape)."""
        cols = [self.columns[n] for n in names]
        if not cols:
            return np.zeros(self.n_rows, np.int64)
        return cell_groups.grouped_index(cols, groups or (None,) * len(cols), shape)


@dataclass
class VariableReport:
    missing: int = 0
    out_of_range: int = 0
    unmapped: int = 0
    unmapped_codes: dict[str, int] = field(default_factory=dict)


@dataclass
class ValidationReport:
    """What loading found. Local only: it may quote local codes, so it never leaves the site."""

    site: str
    path: str
    n_rows: int
    variables: dict[str, VariableReport]
    notes: list[str] = field(default_factory=list)
    unit: str = ""
    rows_per_patient: int = 1
    source_rows: int | None = None

    def to_text(self) -> str:
        head = f"site {self.site}: {self.n_rows} records from {self.path}"
        if self.source_rows is not None:
            head += f" ({self.source_rows} source rows)"
        lines = [head]
        if self.unit:
            lines.append(f"  privacy unit: {privacy_unit.describe(self.unit, self.rows_per_patient)}")
        for name, r in self.variables.items():
            parts = [f"{r.missing} missing"]
            if r.out_of_range:
                parts.append(f"{r.out_of_range} out of range")
            if r.unmapped:
                codes = ", ".join(f"{c!r} x{k}" for c, k in sorted(r.unmapped_codes.items())[:10])
                parts.append(f"{r.unmapped} unmapped ({codes})")
            lines.append(f"  {name:<16} " + ", ".join(parts))
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def encode_column(values: np.ndarray, var: Variable, vm: VariableMapping, m: SiteMapping,
                   first_line: int) -> tuple[np.ndarray, VariableReport]:
    """Encode one column of local values (strings, one per record) into cell indices (OMOP sources)."""
    uniques, inverse = np.unique(values, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(uniques))
    report = VariableReport()
    codes = np.empty(len(uniques), np.int32)
    missing_codes = frozenset({""}) | vm.missing_values
    miss = var.cells.index(MISSING) if var.missing else None

    def where(k: int) -> str:
        row = int(np.argmax(inverse == k))
        return f"{m.path}, data row {row + 1} (line {row + first_line}), column {vm.column!r} ({vm.where_text})"

    for k, u in enumerate(uniques):
        code = norm_code(u)
        if code in missing_codes:
            if miss is None:
                raise MappingError(f"{where(k)}: missing value for {var.name!r}, but the dictionary declares no missing cell")
            codes[k], report.missing = miss, report.missing + counts[k]
        elif var.type == "categorical":
            label = vm.label(code, var)
            if label is None:
                if vm.unmapped == "error":
                    raise MappingError(f"{where(k)}: code {str(u).strip()!r} is not mapped to a category of "
                                       f"{var.name!r} (categories: {list(var.categories)}); add it to "
                                       f"variables.{var.name}.values or set unmapped = \"missing\"")
                label = MISSING if vm.unmapped == "missing" else OTHER
                report.unmapped += counts[k]
                report.unmapped_codes[str(u).strip()] = int(counts[k])
            elif label == MISSING:
                report.missing += counts[k]
            codes[k] = var.cells.index(label)
        else:
            try:
                x = parse_number(str(u))
            except ValueError as e:
                raise MappingError(f"{where(k)}: {e}") from None
            if vm.scale is not None:
                x = x * vm.scale + vm.offset
            codes[k], oor = bin_value(var, float(round_to(x, var.precision)))
            if oor:
                report.out_of_range += counts[k]
    report.missing = int(report.missing)
    report.out_of_range = int(report.out_of_range)
    report.unmapped = int(report.unmapped)
    if var.type == "numeric" and var.out_of_range == "missing":
        report.missing += report.out_of_range
    return codes[inverse].astype(np.int32), report


def bin_value(var: Variable, x: float) -> tuple[int, bool]:
    """Cell index of a numeric value (in dictionary units) and whether it was out of range."""
    lo, hi = var.bins[0], var.bins[-1]
    if lo <= x <= hi:
        i = int(np.searchsorted(var.bins, x, side="right")) - 1
        return min(i, var.n_bins - 1), False
    if var.out_of_range == "clip":
        return (0 if x < lo else var.n_bins - 1), True
    return var.cells.index(OUT_OF_RANGE if var.out_of_range == "cell" else MISSING), True


_bin = bin_value  # server/release/report.py bins with it


def bin_values(var: Variable, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bin_value over an array of values (NaN: missing); returns cells and the out-of-range mask."""
    bins = np.asarray(var.bins)
    lo, hi = bins[0], bins[-1]
    nan = np.isnan(x)
    inside = (x >= lo) & (x <= hi)
    cells = np.minimum(np.searchsorted(bins, np.where(inside, x, lo), side="right") - 1, var.n_bins - 1).astype(np.int64)
    oor = ~inside & ~nan
    if var.out_of_range == "clip":
        cells = np.where(oor, np.where(x < lo, 0, var.n_bins - 1), cells)
    else:
        cells = np.where(oor, var.cells.index(OUT_OF_RANGE if var.out_of_range == "cell" else MISSING), cells)
    if nan.any():
        cells = np.where(nan, var.cells.index(MISSING) if var.missing else -1, cells)
    return cells.astype(np.int32), oor
