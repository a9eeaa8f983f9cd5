"""OMOP CDM as a site source: harmonized variables defined on the CDM's tables.

A site mapping with `[source] format = "omop"` reads CSV exports of the CDM (one `<table>.csv`
per table, header line, empty = NULL) from the directory `path`, or a SQLite database when
`path` ends in .sqlite/.db (read with the standard DB-API module sqlite3). One row per person
of `person` who has an index date:

    [source]
    format = "omop"
    path = "cdm/"                          # relative to the mapping file
    index_date = "observation_period_end"  # | "observation_period_start" | "YYYY-MM-DD"

    [variables.age]
    omop = "age"                           # completed years at the index date (numeric)
    [variables.sex]
    omop = "person"; field = "gender_concept_id"
    values = { "8507" = "male", "8532" = "female" }   # unmapped = "error" | "missing" | "other"
    [variables.gi_bleed]
    omop = "condition"                     # condition | observation | measurement | procedure | drug
    concepts = [192671]; descendants = true             # + descendants from concept_ancestor
    recorded = "yes"; not_recorded = "no"
    [variables.cardiac]
    omop = "condition"
    categories = { mi = [4329847], cad = [317576] }      # the latest recorded category wins
    not_recorded = "none"
    [variables.chol]
    omop = "measurement"; concepts = [3027114]
    value = "latest"                       # latest | first | min | max | mean (numeric variables)
    units = { "8840" = "mg/dL", "8753" = "mmol/L" }      # unit_concept_id -> UCUM (else concept.csv)
    unit = "mg/dL"                         # unit of values whose unit_concept_id is 0 or empty
    window = "before_index"                # on or before the index date (default) | "ever"
    lookback_days = 365                    # optional: only records this close before the index date

The derived columns go through the same encoder as any site table (common/mapping.py), so the
result is the same EncodedTable + ValidationReport. Concept ids named in the mapping are checked
against `concept` when the export has it; `descendants = true` needs `concept_ancestor`.
"""

from __future__ import annotations

import csv
import datetime as dt
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .dictionary import MISSING, Dictionary, Variable
from .codemap import VariableMapping, check_target, norm_code
from .errors import MappingError, did_you_mean
from .units import conversion, parse_number

# kind -> (table, concept column, date column)
EVENT_TABLES = {
    "condition": ("condition_occurrence", "condition_concept_id", "condition_start_date"),
    "observation": ("observation", "observation_concept_id", "observation_date"),
    "measurement": ("measurement", "measurement_concept_id", "measurement_date"),
    "procedure": ("procedure_occurrence", "procedure_concept_id", "procedure_date"),
    "drug": ("drug_exposure", "drug_concept_id", "drug_exposure_start_date"),
}
KINDS = ("age", "person") + tuple(EVENT_TABLES)
INDEX_RULES = ("observation_period_end", "observation_period_start")
VALUE_RULES = ("latest", "first", "min", "max", "mean")
_EVENT_KEYS = {"omop", "concepts", "descendants", "window", "lookback_days"}
_KEYS = {  # (kind, dictionary type) -> keys it takes
    "age": {"omop"},
    "person": {"omop", "field", "values", "unmapped"},
    "categorical": _EVENT_KEYS | {"categories", "recorded", "not_recorded"},
    "numeric": _EVENT_KEYS | {"value", "unit", "units"},
}


@dataclass(frozen=True)
class OmopVariable:
    kind: str
    where: str
    person_column: str = ""
    concepts: dict[str, tuple[int, ...]] = field(default_factory=dict)  # category (or "" for numeric) -> ids
    descendants: bool = False
    not_recorded: str = ""
    window: str = "before_index"
    lookback_days: int | None = None
    value: str = "latest"
    unit: str | None = None
    units: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class OmopSource:
    path: Path
    index_date: str
    variables: dict[str, OmopVariable]


def parse_variable(name: str, spec: dict[str, Any], var: Variable, where: str):
    """An OMOP variable definition -> (OmopVariable, the VariableMapping the encoder applies)."""

    kind = spec["omop"]
    if kind not in KINDS:
        raise MappingError(f"{where}.omop: must be one of {KINDS}, got {kind!r}")
    allowed = _KEYS.get(kind) or _KEYS[var.type]
    for key in spec:
        if key not in allowed:
            raise MappingError(f"{where}: unknown key {key!r} for omop = {kind!r} and a {var.type} variable"
                               + did_you_mean(key, sorted(allowed), f"keys: {sorted(allowed)}"))
    column = f"omop:{name}"
    if kind == "age":
        if var.type != "numeric":
            raise MappingError(f"{where}: omop = 'age' gives years; {var.name!r} is not numeric")
        _convertible("a", var, f"{where}.omop")
        return OmopVariable("age", where), VariableMapping(column, name=name, where_text=where)
    if kind == "person":
        fld = spec.get("field")
        if not isinstance(fld, str) or not fld:
            raise MappingError(f"{where}: omop = 'person' needs field = \"<person column>\" (e.g. gender_concept_id)")
        raw_values = spec.get("values", {})
        if not isinstance(raw_values, dict):
            raise MappingError(f"{where}.values: must be a table of local code = category")
        unmapped = spec.get("unmapped", "error")
        if raw_values and var.type != "categorical":
            raise MappingError(f"{where}.values: only categorical variables take a value map")
        values = {norm_code(k): check_target(v, k, var, f"{where}.values") for k, v in raw_values.items()}
        if unmapped not in ("error", "missing", "other") or (unmapped == "missing" and not var.missing) \
                or (unmapped == "other" and not var.other):
            raise MappingError(f"{where}.unmapped: must be error, missing (needs a missing cell) or other (needs other = true)")
        return (OmopVariable("person", where, person_column=fld),
                VariableMapping(column, values=values, unmapped=unmapped, name=name, where_text=where))
    window = spec.get("window", "before_index")
    if window not in ("before_index", "ever"):
        raise MappingError(f"{where}.window: must be 'before_index' or 'ever', got {window!r}")
    lookback = spec.get("lookback_days")
    if lookback is not None and (isinstance(lookback, bool) or not isinstance(lookback, int) or lookback < 0):
        raise MappingError(f"{where}.lookback_days: must be a non-negative integer")
    common = dict(descendants=bool(spec.get("descendants", False)), window=window, lookback_days=lookback)
    if var.type == "numeric":
        if kind not in ("measurement", "observation"):
            raise MappingError(f"{where}: {var.name!r} is numeric; only omop = 'measurement' or 'observation' carry values")
        value = spec.get("value", "latest")
        if value not in VALUE_RULES:
            raise MappingError(f"{where}.value: must be one of {VALUE_RULES}, got {value!r}")
        units: dict[int, str] = {}
        for k, u in spec.get("units", {}).items():
            if not str(k).isdigit() or not isinstance(u, str):
                raise MappingError(f"{where}.units: keys are unit_concept_ids, values UCUM units ({k!r} = {u!r})")
            _convertible(u, var, f"{where}.units")
            units[int(k)] = u
        unit = spec.get("unit")
        if unit is not None:
            _convertible(unit, var, f"{where}.unit")
        return (OmopVariable(kind, where, concepts={"": _concept_list(spec.get("concepts"), f"{where}.concepts")},
                             value=value, unit=unit, units=units, **common),
                VariableMapping(column, name=name, where_text=where))
    if "categories" in spec:
        cats = spec["categories"]
        if not isinstance(cats, dict) or not cats:
            raise MappingError(f"{where}.categories: must be a table of category = [concept ids]")
        concepts = {str(c): _concept_list(ids, f"{where}.categories.{c}") for c, ids in cats.items()}
    else:
        recorded = spec.get("recorded")
        if not isinstance(recorded, str):
            raise MappingError(f"{where}: give recorded = \"<category>\" with concepts = [...], or categories = {{...}}")
        concepts = {recorded: _concept_list(spec.get("concepts"), f"{where}.concepts")}
    not_recorded = spec.get("not_recorded")
    if not isinstance(not_recorded, str):
        raise MappingError(f"{where}: needs not_recorded = \"<category>\" (or \"missing\") for persons without a record")
    also = "; not_recorded may also be 'missing'" if var.missing else ""
    for label in list(concepts) + [not_recorded]:
        if label not in var.categories and not (label == not_recorded == MISSING and var.missing):
            raise MappingError(f"{where}: {label!r} is not a category of {var.name!r} "
                               f"(categories: {list(var.categories)}{also})")
    return (OmopVariable(kind, where, concepts=concepts, not_recorded=not_recorded, **common),
            VariableMapping(column, name=name, where_text=where))


def _convertible(unit: Any, var: Variable, where: str) -> None:
    try:
        conversion(str(unit), var.unit, var.molar_mass)
    except MappingError as e:
        raise MappingError(f"{where}: {e}") from None


def _concept_list(ids: Any, where: str) -> tuple[int, ...]:
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids):
        raise MappingError(f"{where}: need a non-empty list of positive OMOP concept ids")
    return tuple(ids)


def parse_index_rule(src: dict[str, Any], where: str) -> str:
    rule = src.get("index_date", "observation_period_end")
    if rule not in INDEX_RULES:
        try:
            dt.date.fromisoformat(str(rule))
        except ValueError:
            raise MappingError(f"{where}: source.index_date must be one of {INDEX_RULES} or a date YYYY-MM-DD, "
                               f"got {rule!r}") from None
    return str(rule)


# ---------------------------------------------------------------------------------------------
# Reading the CDM


class _Tables:
    """CDM tables as columns of strings ('' = NULL), from a directory of CSV files or a SQLite file."""

    def __init__(self, path: Path):
        self.path = path
        self.sqlite = path.suffix.lower() in (".sqlite", ".sqlite3", ".db")
        if not path.exists():
            raise MappingError(f"OMOP CDM source {path} not found")
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True) if self.sqlite else None
        self._cache: dict[tuple[str, tuple[str, ...]], dict[str, np.ndarray]] = {}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def where(self, table: str) -> str:
        return f"{self.path}, table {table}" if self.sqlite else str(self.path / f"{table}.csv")

    def has(self, table: str) -> bool:
        if self.sqlite:
            return self._db.execute("SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?",
                                    (table,)).fetchone() is not None
        return (self.path / f"{table}.csv").is_file()

    def header(self, table: str, needed_by: str) -> list[str]:
        if not self.has(table):
            raise MappingError(f"{self.where(table)} not found (needed by {needed_by})")
        if self.sqlite:
            return [r[1] for r in self._db.execute(f'PRAGMA table_info("{table}")')]
        with open(self.path / f"{table}.csv", newline="", encoding="utf-8") as f:
            try:
                return [h.strip().lower() for h in next(csv.reader(f))]
            except StopIteration:
                raise MappingError(f"{self.where(table)}: empty file (expected a header line)") from None

    def read(self, table: str, columns: list[str], needed_by: str) -> dict[str, np.ndarray]:
        key = (table, tuple(columns))
        if key not in self._cache:
            self._cache[key] = self._read(table, columns, needed_by)
        return self._cache[key]

    def _read(self, table: str, columns: list[str], needed_by: str) -> dict[str, np.ndarray]:
        have = self.header(table, needed_by)
        missing = [c for c in columns if c not in have]
        if missing:
            raise MappingError(f"{self.where(table)}: column(s) {missing} not found (needed by {needed_by})")
        if self.sqlite:
            cur = self._db.execute(f"SELECT {', '.join(chr(34) + c + chr(34) for c in columns)} FROM \"{table}\"")
            rows = cur.fetchall()
            return {c: np.array(["" if r[k] is None else str(r[k]) for r in rows], dtype=object)
                    for k, c in enumerate(columns)}
        import pyarrow as pa
        import pyarrow.csv as pcsv

        try:
            t = pcsv.read_csv(self.path / f"{table}.csv", convert_options=pcsv.ConvertOptions(
                include_columns=columns, column_types={c: pa.string() for c in columns}, strings_can_be_null=False))
        except (pa.ArrowException, OSError) as e:
            raise MappingError(f"{self.where(table)}: cannot read CSV: {e}") from None
        return {c: t[c].to_numpy(zero_copy_only=False).astype(object) for c in columns}


def _ints(values: np.ndarray, where: str, column: str, empty: int | None = None) -> np.ndarray:
    try:  # fast path: clean integer text
        return np.asarray(values, dtype=str).astype(np.int64)
    except (ValueError, OverflowError):
        pass
    out = np.empty(len(values), np.int64)
    for i, s in enumerate(values):
        s = s.strip()
        try:
            out[i] = empty if (s == "" and empty is not None) else int(float(s) if "." in s or "e" in s.lower() else s)
        except (ValueError, OverflowError):
            raise MappingError(f"{where}, data row {i + 1}, field {column}: {s!r} is not an integer") from None
    return out


def _dates(values: np.ndarray, where: str, column: str) -> np.ndarray:
    text = [s.strip()[:10] for s in values]
    try:
        out = np.array(text, dtype="datetime64[D]")
        bad = np.flatnonzero(np.isnat(out))
    except ValueError:
        bad = [i for i, s in enumerate(text) if not _is_date(s)]
    if len(bad):
        i = int(bad[0])
        raise MappingError(f"{where}, data row {i + 1}, field {column}: {values[i]!r} is not a date (YYYY-MM-DD)")
    return out


def _is_date(s: str) -> bool:
    try:
        dt.date.fromisoformat(s)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Deriving the harmonized columns


def read_columns(mapping, dictionary: Dictionary) -> tuple[dict[str, np.ndarray], int, list[str]]:
    """Derived string columns (keyed by the VariableMapping column), first line (1), and report notes."""
    src: OmopSource = mapping.omop
    tables = _Tables(src.path)
    try:
        return _derive(tables, src, mapping, dictionary)
    finally:
        tables.close()


def _derive(tables: _Tables, src: OmopSource, mapping, dictionary: Dictionary):

    person_fields = sorted({ov.person_column for ov in src.variables.values() if ov.kind == "person"})
    age = any(ov.kind == "age" for ov in src.variables.values())
    pcols = ["person_id"] + (["year_of_birth"] if age else []) + [f for f in person_fields if f != "person_id"]
    header = tables.header("person", "every OMOP mapping")
    for ov in src.variables.values():
        if ov.kind == "person" and ov.person_column not in header:
            raise MappingError(f"{tables.where('person')}: column {ov.person_column!r} not found (needed by {ov.where})")
    if age:
        pcols += [c for c in ("month_of_birth", "day_of_birth") if c in header]
    person = tables.read("person", list(dict.fromkeys(pcols)), "the cohort (person)")
    pwhere = tables.where("person")
    ids = _ints(person["person_id"], pwhere, "person_id")
    if len(np.unique(ids)) != len(ids):
        dup = ids[np.flatnonzero(np.bincount(np.unique(ids, return_inverse=True)[1]) > 1)[0]]
        raise MappingError(f"{pwhere}: person_id {dup} appears more than once")
    index, notes = _index_dates(tables, src.index_date, ids)
    keep = ~np.isnat(index)
    if not keep.any():
        raise MappingError(f"{pwhere}: no person has an index date ({src.index_date})")
    rows = np.flatnonzero(keep)
    ids, index = ids[rows], index[rows]
    order = np.argsort(ids)
    ucum = _check_concepts(tables, src)
    out: dict[str, np.ndarray] = {}
    for name, ov in src.variables.items():
        var, column = dictionary[name], mapping.variables[name].column
        if ov.kind == "age":
            out[column] = _age(person, rows, index, var, pwhere)
        elif ov.kind == "person":
            raw = np.array([norm_code(s) for s in person[ov.person_column][rows]], dtype=object)
            _check_person_codes(raw, ids, var, mapping.variables[name], ov, pwhere)
            out[column] = raw
        else:
            out[column] = _events(tables, ov, var, ids, order, index, ucum)
        if not var.missing and (out[column] == "").any():
            k = int(np.flatnonzero(out[column] == "")[0])
            raise MappingError(f"{ov.where}: person_id {ids[k]} has no value for {name!r} ({_why(ov)}), and the "
                               f"dictionary declares no missing cell for it")
    return out, 1, notes


def _why(ov: OmopVariable) -> str:
    if ov.kind == "age":
        return "no year_of_birth"
    if ov.kind == "person":
        return f"empty person.{ov.person_column}"
    return f"no {EVENT_TABLES[ov.kind][0]} record of its concepts {ov.window.replace('_', ' ')}"


def _index_dates(tables: _Tables, rule: str, ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    if rule not in INDEX_RULES:
        return np.full(len(ids), np.datetime64(rule, "D")), []
    end = rule == "observation_period_end"
    col = "observation_period_end_date" if end else "observation_period_start_date"
    op = tables.read("observation_period", ["person_id", col], f"index_date = {rule!r}")
    where = tables.where("observation_period")
    pid, date = _ints(op["person_id"], where, "person_id"), _dates(op[col], where, col).astype(np.int64)
    sorter = np.argsort(ids)
    pos = np.clip(np.searchsorted(ids, pid, sorter=sorter), 0, len(ids) - 1)
    hit = ids[sorter[pos]] == pid
    # the latest end (or the earliest start) of the person's observation periods
    none = np.iinfo(np.int64).min if end else np.iinfo(np.int64).max
    acc = np.full(len(ids), none, np.int64)
    (np.maximum if end else np.minimum).at(acc, sorter[pos[hit]], date[hit])
    out = np.where(acc == none, np.datetime64("NaT", "D"), acc.astype("datetime64[D]"))
    n_without = int(np.isnat(out).sum())
    notes = [f"{n_without} person(s) without an observation period were left out (index_date = {rule})"] if n_without else []
    return out, notes


def _check_concepts(tables: _Tables, src: OmopSource) -> dict[int, str]:
    """Check the mapping's concept ids against `concept` (when the export has it); return its UCUM unit concepts."""
    wanted = {(c, ov.where) for ov in src.variables.values() for ids in ov.concepts.values() for c in ids}
    if not wanted or not tables.has("concept"):
        return {}
    where = tables.where("concept")
    concept = tables.read("concept", ["concept_id", "vocabulary_id", "concept_code"], "concept id checks")
    ids = _ints(concept["concept_id"], where, "concept_id")
    known = set(ids.tolist())
    for c, w in sorted(wanted, key=lambda x: (x[1], x[0])):
        if c not in known:
            raise MappingError(f"{w}: concept {c} is not in {where} (field concept_id)")
    ucum = concept["vocabulary_id"] == "UCUM"
    return dict(zip(ids[ucum].tolist(), concept["concept_code"][ucum].tolist()))


def _age(person: dict[str, np.ndarray], rows: np.ndarray, index: np.ndarray, var: Variable, where: str) -> np.ndarray:
    yob = person["year_of_birth"][rows]
    month = person.get("month_of_birth", np.full(len(person["year_of_birth"]), "", dtype=object))[rows]
    day = person.get("day_of_birth", np.full(len(person["year_of_birth"]), "", dtype=object))[rows]
    scale, offset = conversion("a", var.unit)
    out = np.empty(len(rows), dtype=object)
    for k, (y, m, d, ix) in enumerate(zip(yob, month, day, index.astype(object))):
        if not y.strip():
            out[k] = ""
            continue
        try:
            years = ix.year - int(float(y))
            if m.strip() and d.strip() and (ix.month, ix.day) < (int(float(m)), int(float(d))):
                years -= 1  # birthday not reached yet in the index year
        except ValueError:
            raise MappingError(f"{where}, data row {rows[k] + 1}: year/month/day of birth {y!r}/{m!r}/{d!r} "
                               f"are not integers") from None
        out[k] = repr(years * scale + offset)
    return out


def _check_person_codes(raw: np.ndarray, ids: np.ndarray, var: Variable, vm, ov: OmopVariable, where: str) -> None:
    if var.type != "categorical" or vm.unmapped != "error":
        return
    for k, code in enumerate(raw):
        if code and vm.label(code, var) is None:
            raise MappingError(f"{where}, person_id {ids[k]}, field {ov.person_column}: code {code!r} is not mapped to a "
                               f"category of {var.name!r} (categories: {list(var.categories)}); add it to "
                               f"{ov.where.split(': ', 1)[1]}.values or set unmapped = \"missing\"")


def _expand(tables: _Tables, ov: OmopVariable) -> dict[str, set[int]]:
    sets = {label: set(ids) for label, ids in ov.concepts.items()}
    if ov.descendants:
        anc = tables.read("concept_ancestor", ["ancestor_concept_id", "descendant_concept_id"], f"{ov.where} (descendants = true)")
        where = tables.where("concept_ancestor")
        a = _ints(anc["ancestor_concept_id"], where, "ancestor_concept_id")
        d = _ints(anc["descendant_concept_id"], where, "descendant_concept_id")
        for label, ids in sets.items():
            ids |= set(d[np.isin(a, list(ids))].tolist())
    return sets


def _events(tables: _Tables, ov: OmopVariable, var: Variable, ids: np.ndarray, order: np.ndarray,
            index: np.ndarray, ucum: dict[int, str]) -> np.ndarray:
    table, ccol, dcol = EVENT_TABLES[ov.kind]
    numeric = var.type == "numeric"
    cols = ["person_id", ccol, dcol] + (["value_as_number", "unit_concept_id"] if numeric else [])
    data = tables.read(table, cols, ov.where)
    where = tables.where(table)
    concept = _ints(data[ccol], where, ccol, empty=0)
    sets = _expand(tables, ov)
    labels = list(sets)
    cat = np.full(len(concept), -1)
    for k, label in enumerate(labels):
        cat[(cat < 0) & np.isin(concept, list(sets[label]))] = k
    sel = np.flatnonzero(cat >= 0)
    pid = _ints(data["person_id"][sel], where, "person_id")
    date = _dates(data[dcol][sel], where, dcol)
    pos = np.clip(np.searchsorted(ids, pid, sorter=order), 0, len(ids) - 1)
    person = order[pos]
    ok = ids[person] == pid  # records of persons outside the cohort are ignored
    if ov.window == "before_index":
        ok &= date <= index[person]
        if ov.lookback_days is not None:
            ok &= date >= index[person] - np.timedelta64(ov.lookback_days, "D")
    sel, person, date = sel[ok], person[ok], date[ok]
    if not numeric:
        out = np.full(len(ids), ov.not_recorded if ov.not_recorded != MISSING else "", dtype=object)
        # latest record wins; on the same day, the category listed first
        key = date.astype(np.int64) * len(labels) + (len(labels) - 1 - cat[sel])
        best = np.full(len(ids), np.iinfo(np.int64).min)
        np.maximum.at(best, person, key)
        has = best > np.iinfo(np.int64).min
        won = len(labels) - 1 - np.mod(best[has], len(labels))
        out[has] = np.array(labels, dtype=object)[won]
        return out
    values = _numbers(data, sel, where, ov, var, ucum)
    good = ~np.isnan(values)
    person, date, values, sel = person[good], date[good], values[good], sel[good]
    out = np.full(len(ids), "", dtype=object)
    if not len(values):
        return out
    if ov.value in ("latest", "first"):
        rank = np.lexsort((sel, date))  # records by date, then file order
        position = np.empty(len(rank), np.int64)
        position[rank] = np.arange(len(rank))
        latest = ov.value == "latest"
        best = np.full(len(ids), -1 if latest else len(rank), np.int64)
        (np.maximum if latest else np.minimum).at(best, person, position)
        has = (best >= 0) & (best < len(rank))
        out[has] = [repr(float(v)) for v in values[rank[best[has]]]]
        return out
    agg = {"min": np.fmin, "max": np.fmax}
    if ov.value in agg:
        acc = np.full(len(ids), np.nan)
        agg[ov.value].at(acc, person, values)
    else:
        sums, counts = np.zeros(len(ids)), np.zeros(len(ids))
        np.add.at(sums, person, values)
        np.add.at(counts, person, 1)
        acc = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    has = ~np.isnan(acc)
    out[has] = [repr(float(v)) for v in acc[has]]
    return out


def _numbers(data: dict[str, np.ndarray], sel: np.ndarray, where: str, ov: OmopVariable, var: Variable,
             ucum: dict[int, str]) -> np.ndarray:
    """value_as_number of the selected rows in the dictionary's unit (NaN where there is no value)."""
    units = {**ucum, **ov.units}
    factors: dict[int, tuple[float, float]] = {}
    out = np.full(len(sel), np.nan)
    for k, i in enumerate(sel):
        s = data["value_as_number"][i].strip()
        if not s:
            continue
        try:
            x = parse_number(s)
        except ValueError as e:
            raise MappingError(f"{where}, data row {i + 1}, field value_as_number: {e}") from None
        u = data["unit_concept_id"][i].strip()
        uid = int(float(u)) if u else 0
        if uid not in factors:
            unit = units.get(uid) or (ov.unit if uid == 0 else None)
            if unit is None:
                raise MappingError(f"{where}, data row {i + 1}, field unit_concept_id: unit concept {uid} of "
                                   f"{var.name!r} is unknown; add it to {ov.where.split(': ', 1)[1]}.units "
                                   f"(unit_concept_id = UCUM unit)")
            try:
                factors[uid] = conversion(unit, var.unit, var.molar_mass)
            except MappingError as e:
                raise MappingError(f"{where}, data row {i + 1}, field unit_concept_id ({uid} = {unit}): {e}") from None
        a, b = factors[uid]
        out[k] = x * a + b
    return out
