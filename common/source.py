"""Site sources on DuckDB: one or more tables, joined by patient key, reduced to one record per patient.

The site's tables (CSV/TSV and Parquet files read by DuckDB, or tables of the site's own DuckDB or
SQLite database) are copied, needed columns only, into an in-memory DuckDB database that spills
to a private temporary directory (mode 0700, removed afterwards) above `source.memory_limit`, so
tables larger than memory load. Then, per table:

1. every needed value is checked (numbers parse, times parse, categorical codes map) and the
   first bad one is reported by file, data row, column and mapping variable;
2. each patient's rows are reduced to one value per variable by its declared rule (first, last,
   min, max, mean, count, any; within a window from the patient's index event), or, without a
   rule, the patient must have at most one (matching) row: otherwise the source is refused,
   because a patient with several rows would lose more than the rho the guard debits;
3. values are converted to the dictionary's unit, rounded to its precision, and binned.

With `rows_per_patient = k > 1` the cohort table's rows are the records, at most k per patient
(the others dropped by a declared rule), and the guard charges group privacy (common/privacy_unit.py).
The result is an EncodedTable of one int32 column of cell indices per dictionary variable and a
ValidationReport that stays at the site. Messages about the data name files, rows, columns and
counts; they may quote a local value (they are shown only to the site admin) but never a patient id.
"""

from __future__ import annotations

import codecs
import csv
import re
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import omop, privacy_unit
from .dictionary import MISSING, OTHER, Dictionary
from .errors import MappingError, did_you_mean
from .mapping import (EncodedTable, encode_column, SiteMapping, TableSpec, ValidationReport, VariableMapping, VariableReport,
                      bin_values, norm_code)
from .units import round_to

DUCKDB_ENCODINGS = {"utf-8": "utf-8", "iso8859-1": "latin-1", "utf-16": "utf-16"}
SQLITE_BATCH = 100_000


def _q(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _s(text: str) -> str:
    """A quoted SQL string literal."""
    return "'" + str(text).replace("'", "''") + "'"


@dataclass
class _Loaded:
    spec: TableSpec
    sql: str  # the view with _r (file order), _k (patient key), _t (time) and the needed columns
    columns: dict[str, str]  # source column -> SQL column
    text: set[str]  # source columns stored as text
    n_rows: int
    first_line: int | None  # file line of data row 1 (None: not a text file)
    notes: list[str] = field(default_factory=list)
    numbers: dict[str, str] = field(default_factory=dict)  # source column -> SQL column of its parsed number

    def where(self, row: int, column: str | None = None) -> str:
        at = f"{self.spec.label}, data row {row + 1}"
        if self.first_line is not None:
            at += f" (line {row + self.first_line})"
        return at + (f", column {column!r}" if column else "")


def load(mapping: SiteMapping, dictionary: Dictionary) -> tuple[EncodedTable, ValidationReport]:
    """Load a table-based site source (see the module docstring)."""
    import duckdb

    tmp = tempfile.mkdtemp(prefix="ppsehr-source-")  # mode 0700: spilled pages hold patient data
    con = duckdb.connect(":memory:", config={
        "memory_limit": mapping.memory_limit, "temp_directory": tmp, "preserve_insertion_order": True,
        "autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        return _Loader(con, mapping, dictionary, Path(tmp)).run()
    except duckdb.Error as e:
        raise MappingError(f"{mapping.source}: reading the source failed: {str(e).splitlines()[0]}") from None
    finally:
        con.close()
        shutil.rmtree(tmp, ignore_errors=True)


class _Loader:
    def __init__(self, con, mapping: SiteMapping, dictionary: Dictionary, tmp: Path):
        self.con, self.m, self.d, self.tmp = con, mapping, dictionary, tmp
        self.notes: list[str] = []
        self.reports: dict[str, VariableReport] = {}
        self.columns: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------------------------ reading
    def needed(self) -> dict[str, dict[str, str]]:
        """table -> source column -> what needs it (for messages)."""
        m = self.m
        out: dict[str, dict[str, str]] = {t: {} for t in m.tables}
        for name, t in m.tables.items():
            w = t.where.split(": ", 1)[-1].replace("[source]", "source")
            if t.key:
                out[name].setdefault(t.key, "source.patient_key" if t.key == m.patient_key else f"{w}.key")
            if t.time:
                out[name].setdefault(t.time, f"{w}.time")
        if m.index and m.index.table:
            out[m.index.table].setdefault(m.index.time, "source.index.time")
            for col, _ in m.index.where:
                out[m.index.table].setdefault(col, "source.index.where")
        for vm in m.variables.values():
            if vm.absent:
                continue
            w = vm.where_text.split(": ", 1)[-1]
            if vm.column:
                out[vm.table].setdefault(vm.column, w)
            for col, _ in vm.where:
                out[vm.table].setdefault(col, f"{w}.where")
        return out

    @staticmethod
    def _parse_number(column: str, text: bool, decimal: str) -> str:
        if not text:
            return f"TRY_CAST({column} AS DOUBLE)"
        value = f"NULLIF(trim({column}), '')"
        return f"TRY_CAST({f'replace({value}, {_s(decimal)}, {_s(chr(46))})' if decimal != '.' else value} AS DOUBLE)"

    def load_table(self, spec: TableSpec, needed: dict[str, str], n: int, numeric: set[str] = frozenset(),
                   uses_text: set[str] = frozenset()) -> _Loaded:
        cols = list(needed)
        sqlcols = {c: f"c{j}" for j, c in enumerate(cols)}
        if spec.format in ("csv", "tsv"):
            select, text, first_line = self._csv(spec, needed, sqlcols)
        elif spec.format == "parquet":
            if not spec.path.exists():
                raise MappingError(f"{self.m.source}: data file {spec.path} not found ({spec.where})")
            types = self._describe(f"read_parquet({_s(spec.path)})", spec)
            self._check_columns(spec, needed, list(types))
            text = {c for c in cols if types[c].upper() == "VARCHAR"}
            select = (f"SELECT {', '.join(f'{_q(c)} AS {sqlcols[c]}' for c in cols) or '1 AS _none'} "
                      f"FROM read_parquet({_s(spec.path)})")
            first_line = None
        elif spec.path.suffix.lower() in (".duckdb", ".ddb"):
            if not spec.path.exists():
                raise MappingError(f"{self.m.source}: database {spec.path} not found")
            if not self.con.execute("SELECT 1 FROM duckdb_databases() WHERE database_name = 'site_db'").fetchall():
                self.con.execute(f"ATTACH {_s(spec.path)} AS site_db (READ_ONLY)")
            found = self.con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = 'site_db' UNION "
                                 "SELECT view_name FROM duckdb_views() WHERE database_name = 'site_db'").fetchall()
            if spec.table not in {r[0] for r in found}:
                raise MappingError(f"{spec.path}: no table {spec.table!r} (needed by {spec.where}; tables: "
                                   f"{sorted(r[0] for r in found)})")
            types = self._describe(f"site_db.{_q(spec.table)}", spec)
            self._check_columns(spec, needed, list(types))
            text = {c for c in cols if types[c].upper() == "VARCHAR"}
            select = (f"SELECT {', '.join(f'{_q(c)} AS {sqlcols[c]}' for c in cols) or '1 AS _none'} "
                      f"FROM site_db.{_q(spec.table)}")
            first_line = None
        else:
            select, text, first_line = self._sqlite(spec, needed, sqlcols, n)
        # One pass over the source: the patient key, the time and every number parsed once, next to the raw text.
        table = f"t{n}"
        key = f"NULLIF(trim(CAST({sqlcols[spec.key]} AS VARCHAR)), '')" if spec.key else "NULL::VARCHAR"
        time = "NULL::TIMESTAMP"
        if spec.time:
            time = f"TRY_CAST(NULLIF(trim(CAST({sqlcols[spec.time]} AS VARCHAR)), '') AS TIMESTAMP)"
        numbers = {c: f"n{j}" for j, c in enumerate(cols) if c in numeric}
        parsed = "".join(f", {self._parse_number(sqlcols[c], c in text, spec.decimal)} AS {numbers[c]}" for c in numbers)
        # Raw text is kept where it is read as text; where a column is only a number, a time or the key, only
        # where it did not parse (for the error message): a large table then holds little more than numbers.
        kept = []
        for c in cols:
            x = sqlcols[c]
            if c in uses_text:
                kept.append(x)
            elif c in numbers:
                kept.append(f"CASE WHEN {numbers[c]} IS NULL OR NOT isfinite({numbers[c]}) THEN {x} END AS {x}")
            elif c == spec.time:
                kept.append(f"CASE WHEN _t IS NULL THEN {x} END AS {x}")
        outer = ", ".join(["_k", "_t"] + list(numbers.values()) + kept)
        self._try(f"CREATE TABLE {table} AS SELECT {outer} FROM (SELECT {key} AS _k, {time} AS _t, *{parsed} "
                  f"FROM ({select}))", spec)
        row_key = "" if spec.key else ", CAST(rowid AS VARCHAR) AS _k"
        self.con.execute(f"CREATE VIEW v{n} AS SELECT rowid AS _r{row_key}, * {'EXCLUDE (_k)' if row_key else ''} "
                         f"FROM {table}")
        rows = self.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        loaded = _Loaded(spec, f"v{n}", sqlcols, set(text), rows, first_line, numbers=numbers)
        if spec.time:
            c = sqlcols[spec.time]
            bad = self.con.execute(f"SELECT _r, CAST({c} AS VARCHAR) FROM v{n} WHERE _t IS NULL AND "
                               f"NULLIF(trim(CAST({c} AS VARCHAR)), '') IS NOT NULL ORDER BY _r LIMIT 1").fetchone()
            if bad:
                raise MappingError(f"{loaded.where(bad[0], spec.time)} ({needed[spec.time]}): {bad[1]!r} is not a date or "
                                   "time (YYYY-MM-DD, optionally with HH:MM[:SS])")
        return loaded

    def _describe(self, relation: str, spec: TableSpec) -> dict[str, str]:
        import duckdb

        try:
            return {r[0]: r[1] for r in self.con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()}
        except duckdb.Error as e:
            raise MappingError(f"{spec.label}: cannot read it: {str(e).splitlines()[0]}") from None

    def _check_columns(self, spec: TableSpec, needed: dict[str, str], have: list[str]) -> None:
        for column, by in needed.items():
            if column not in have:
                raise MappingError(f"{spec.label}: column {column!r} not found (needed by {by})"
                                   f"{did_you_mean(column, have)} (columns: {have})")

    def _csv(self, spec: TableSpec, needed: dict[str, str], sqlcols: dict[str, str]):
        path = spec.path
        if not path.exists():
            raise MappingError(f"{self.m.source}: data file {path} not found ({spec.where})")
        encoding = codecs.lookup(spec.encoding).name
        if encoding not in DUCKDB_ENCODINGS:  # DuckDB reads utf-8, latin-1 and utf-16: others are transcoded
            path = self._transcode(spec)
            encoding = "utf-8"
        names = list(spec.columns)
        if spec.header:
            try:
                if encoding == "utf-16":
                    with open(path, newline="", encoding="utf-16") as f:
                        first = f.readline()
                else:  # decode the header line alone: DuckDB names the line of any later decoding error
                    with open(path, "rb") as f:
                        first = f.readline().decode(encoding if path == spec.path else "utf-8")
                hdr = next(csv.reader([first], delimiter=spec.delimiter), None) if first.strip() else None
            except UnicodeDecodeError as e:
                raise MappingError(f"{spec.label}, line 1: not {spec.encoding} text ({e.reason} at byte {e.start}); "
                                   "set source.encoding (e.g. \"latin-1\" or \"cp1252\")") from None
            if hdr is None:
                raise MappingError(f"{spec.label}: empty file (expected a header line)")
            hdr = [h.strip().lstrip("\ufeff") for h in hdr]
            names = names or hdr
        self._check_columns(spec, needed, names)
        index = {c: i for i, c in enumerate(names)}
        width = len(names)
        columns = "{" + ", ".join(f"'x{i}': 'VARCHAR'" for i in range(width)) + "}"
        reader = (f"read_csv({_s(path)}, delim={_s(spec.delimiter)}, header={str(spec.header).lower()}, "
                  f"auto_detect=false, columns={columns}, quote='\"', escape='\"', strict_mode=true, "
                  f"null_padding=false, encoding={_s(DUCKDB_ENCODINGS[encoding])})")
        select = f"SELECT {', '.join(f'x{index[c]} AS {sqlcols[c]}' for c in needed) or '1 AS _none'} FROM {reader}"
        return select, set(needed), 2 if spec.header else 1

    def _try(self, sql: str, spec: TableSpec) -> None:
        import duckdb

        try:
            self.con.execute(sql)
        except duckdb.Error as e:
            text = str(e)
            line = re.search(r"CSV Error on Line: (\d+)", text)
            fields = re.search(r"Expected Number of Columns: (\d+) Found: (\d+)", text)
            if line and fields:
                raise MappingError(f"{spec.label}, line {line.group(1)}: expected {fields.group(1)} fields, found "
                                   f"{fields.group(2)}") from None
            if line and "unicode" in text.lower():
                raise MappingError(f"{spec.label}, line {line.group(1)}: not {spec.encoding} text; set source.encoding "
                                   "(e.g. \"latin-1\" or \"cp1252\")") from None
            if line:
                raise MappingError(f"{spec.label}, line {line.group(1)}: malformed CSV ({text.splitlines()[0]})") from None
            raise MappingError(f"{spec.label}: cannot read it: {text.splitlines()[0]}") from None

    def _transcode(self, spec: TableSpec) -> Path:
        out = self.tmp / f"transcoded-{len(list(self.tmp.iterdir()))}.csv"
        try:
            with open(spec.path, encoding=spec.encoding, newline="") as src, open(out, "w", encoding="utf-8", newline="") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except UnicodeDecodeError as e:
            raise MappingError(f"{spec.label}: not {spec.encoding} text ({e.reason} at byte {e.start})") from None
        return out

    def _sqlite(self, spec: TableSpec, needed: dict[str, str], sqlcols: dict[str, str], n: int):
        import pyarrow as pa

        if not spec.path.exists():
            raise MappingError(f"{self.m.source}: database {spec.path} not found")
        db = sqlite3.connect(f"file:{spec.path}?mode=ro", uri=True)
        try:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?",
                          (spec.table,)).fetchone() is None:
                raise MappingError(f"{spec.path}: no table {spec.table!r} (needed by {spec.where})")
            have = [r[1] for r in db.execute(f"PRAGMA table_info({_q(spec.table)})")]
            self._check_columns(spec, needed, have)
            cols = list(needed)
            staging = f"s{n}"
            self.con.execute(f"CREATE TABLE {staging} ({', '.join(f'{sqlcols[c]} VARCHAR' for c in cols) or '_none INTEGER'})")
            cur = db.execute(f"SELECT {', '.join(f'CAST({_q(c)} AS TEXT)' for c in cols) or '1'} FROM {_q(spec.table)} "
                             "ORDER BY rowid")
            while True:
                batch = cur.fetchmany(SQLITE_BATCH)
                if not batch:
                    break
                arrow = pa.table({sqlcols[c]: pa.array([r[j] for r in batch], pa.string()) for j, c in enumerate(cols)}
                                 if cols else {"_none": pa.array([1] * len(batch), pa.int32())})
                self.con.register("sqlite_batch", arrow)
                self.con.execute(f"INSERT INTO {staging} SELECT * FROM sqlite_batch")
                self.con.unregister("sqlite_batch")
        except sqlite3.Error as e:
            raise MappingError(f"{spec.label}: cannot read it: {e}") from None
        finally:
            db.close()
        return f"SELECT * FROM {staging}", set(needed), None

    # ------------------------------------------------------------------------------------ values
    def text_expr(self, t: _Loaded, column: str) -> str:
        return f"NULLIF(trim(CAST({t.columns[column]} AS VARCHAR)), '')"

    def num_expr(self, t: _Loaded, column: str) -> str:
        if column in t.numbers:
            return t.numbers[column]
        text = self.text_expr(t, column)
        if column in t.text and t.spec.decimal == ",":
            text = f"replace({text}, ',', '.')"
        return f"TRY_CAST({text} AS DOUBLE)"

    def missing_expr(self, t: _Loaded, vm: VariableMapping) -> str:
        codes = (t.spec.missing_values | vm.missing_values) - {""}
        nums, texts = [], []
        for c in sorted(codes):
            try:
                nums.append(float(c))
            except ValueError:
                texts.append(c)
        text = self.text_expr(t, vm.column)
        empty = f"{text} IS NULL" + (f" OR {text} IN ({', '.join(map(_s, texts))})" if texts else "")
        if vm.column in t.numbers:  # the raw text is kept only where the number did not parse
            empty = f"({t.numbers[vm.column]} IS NULL AND ({empty}))"
        parts = [empty]
        if nums:
            parts.append(f"{self.num_expr(t, vm.column)} IN ({', '.join(repr(x) for x in nums)})")
        return "COALESCE(" + " OR ".join(parts) + ", false)"  # NULL IN (...) is NULL, not false

    def filter_expr(self, t: _Loaded, where) -> str:
        parts = []
        for column, codes in where:
            text = self.text_expr(t, column)
            alts = []
            exact = [c for c in codes if not c.endswith("*")]
            if exact:
                alts.append(f"{text} IN ({', '.join(map(_s, exact))})")
                nums = []
                for c in exact:
                    try:
                        nums.append(float(c))
                    except ValueError:
                        pass
                if nums:
                    alts.append(f"TRY_CAST({text} AS DOUBLE) IN ({', '.join(repr(x) for x in nums)})")
            alts += [f"starts_with({text}, {_s(c[:-1])})" for c in codes if c.endswith("*")]
            parts.append("COALESCE(" + " OR ".join(alts) + ", false)")
        return " AND ".join(parts) or "true"

    def window_expr(self, vm: VariableMapping) -> str:
        if vm.window_days is None:
            return "true"
        a, b = vm.window_days
        ix = f"epoch(TIMESTAMP {_s(self.m.index.date)})" if self.m.index.date else "epoch(_ix)"
        return f"(_t IS NOT NULL AND {ix} IS NOT NULL AND epoch(_t) BETWEEN {ix} + {a * 86400!r} AND {ix} + {b * 86400!r})"

    # ------------------------------------------------------------------------------------ loading
    def run(self) -> tuple[EncodedTable, ValidationReport]:
        m, d = self.m, self.d
        needed = self.needed()
        numeric = {name: {vm.column for vm in m.variables.values() if vm.table == name and vm.column and not vm.absent
                          and d[vm.name].type == "numeric"} for name in m.tables}
        uses_text = {name: set() for name in m.tables}  # columns read as codes or text
        for vm in m.variables.values():
            if not vm.absent:
                uses_text[vm.table] |= {c for c, _ in vm.where}
                if vm.column and d[vm.name].type != "numeric":
                    uses_text[vm.table].add(vm.column)
        if m.index and m.index.table:
            uses_text[m.index.table] |= {c for c, _ in m.index.where}
            if m.index.time != m.tables[m.index.table].time:
                uses_text[m.index.table].add(m.index.time)
        loaded = {name: self.load_table(spec, needed[name], n, numeric[name], uses_text[name])
                  for n, (name, spec) in enumerate(m.tables.items())}
        cohort = loaded[m.cohort]
        if cohort.n_rows == 0:
            raise MappingError(f"{cohort.spec.label}: the table has no data rows")
        n_records = self.records(cohort)
        if m.index and m.index.table:
            self.index(loaded[m.index.table])
        by_table: dict[str, list[str]] = {}
        for name, vm in m.variables.items():
            if vm.absent:
                var = d[name]
                self.columns[name] = np.full(n_records, var.cell_index(MISSING), np.int32)
                self.reports[name] = VariableReport(missing=n_records)
            else:
                by_table.setdefault(vm.table, []).append(name)
        for table, names in by_table.items():
            self.table_variables(loaded[table], names, n_records)
        for name, t in loaded.items():
            if name != m.cohort and t.spec.key:
                outside = self.con.execute(f"SELECT count(*) FILTER (WHERE _k IS NULL), count(*) FILTER (WHERE _k IS NOT "
                                       f"NULL AND _k NOT IN (SELECT _k FROM patients)) FROM {t.sql}").fetchone()
                if outside[0] or outside[1]:
                    self.notes.append(f"table {name} ({t.spec.label}): {outside[1]} row(s) of patients not in the cohort "
                                      f"({m.cohort}) and {outside[0]} row(s) without a patient key were ignored")
        source_rows = sum(t.n_rows for t in loaded.values())
        unit, k = m.unit, m.rows_per_patient
        columns = {name: self.columns[name] for name in d.variables}
        return (EncodedTable(columns, n_records, unit, k),
                ValidationReport(m.site, ", ".join(t.spec.label for t in loaded.values()), n_records,
                                 {name: self.reports[name] for name in d.variables}, self.notes, unit, k, source_rows))

    def records(self, cohort: _Loaded) -> int:
        """Create `patients` (_k, pos) and, with rows_per_patient > 1, `records` (_r, _k, pos); return the count."""
        m, spec = self.m, cohort.spec
        if m.patient_key == "row":
            self.notes.append(f"patient_key = \"row\": each of the {cohort.n_rows} rows of {spec.label} is one patient, "
                              "as the site admin attests (the source has no patient id to check it)")
            return cohort.n_rows
        empty = self.con.execute(f"SELECT count(*), min(_r) FROM {cohort.sql} WHERE _k IS NULL").fetchone()
        if empty[0]:
            raise MappingError(f"{cohort.where(empty[1], spec.key)}: empty patient key ({empty[0]} row(s) of the cohort "
                               f"table {m.cohort!r} have none); every row must name its patient")
        self.con.execute(f"CREATE TABLE patients AS SELECT _k, row_number() OVER (ORDER BY min(_r)) - 1 AS pos "
                         f"FROM {cohort.sql} GROUP BY _k")
        n_patients = self.con.execute("SELECT count(*) FROM patients").fetchone()[0]
        k = m.rows_per_patient
        if k == 1:
            return n_patients
        if m.keep == "sample":  # a seeded mix of the row's position: the same rows at every start, in any DuckDB
            p, seed = 2**61 - 1, m.seed % (2**61 - 1)
            order = (f"((((CAST(_r AS HUGEINT) + {seed}) * 2258633747088074169) % {p}) * 1499779743744070123 + {seed}) "
                     f"% {p}, _r")
        else:
            desc = "DESC" if m.keep == "latest" else "ASC"
            order = (f"_t {desc} NULLS LAST, _r {desc}" if spec.time else f"_r {desc}")
        self.con.execute(f"CREATE TABLE records AS SELECT _r, _k, row_number() OVER (ORDER BY _r) - 1 AS pos FROM "
                         f"(SELECT _r, _k, row_number() OVER (PARTITION BY _k ORDER BY {order}) AS rn FROM {cohort.sql}) "
                         f"WHERE rn <= {k}")
        over, most, dropped = self.con.execute(f"SELECT count(*), max(n), sum(n - {k}) FROM (SELECT count(*) AS n FROM "
                                           f"{cohort.sql} GROUP BY _k) WHERE n > {k}").fetchone()
        n_records = self.con.execute("SELECT count(*) FROM records").fetchone()[0]
        by = {"sample": f"a sample seeded with {m.seed}",
              "latest": f"the latest by {spec.time}" if spec.time else "the last in file order",
              "earliest": f"the earliest by {spec.time}" if spec.time else "the first in file order"}[m.keep]
        self.notes.append(f"rows_per_patient = {k}: {n_records} records of {n_patients} patients from {cohort.n_rows} rows "
                          f"of {spec.label}" + (f"; {over} patient(s) had more than {k} rows (up to {most}): {int(dropped)} "
                                                f"row(s) dropped, {k} kept by {by}" if over else ""))
        return n_records

    def index(self, t: _Loaded) -> None:
        ix = self.m.index
        time = "_t" if ix.time == t.spec.time else \
            f"TRY_CAST(NULLIF(trim(CAST({t.columns[ix.time]} AS VARCHAR)), '') AS TIMESTAMP)"
        agg = "min" if ix.rule == "first" else "max"
        self.con.execute(f"CREATE TABLE idx AS SELECT _k, {agg}({time}) AS _ix FROM {t.sql} WHERE {time} IS NOT NULL "
                         f"AND {self.filter_expr(t, ix.where)} AND _k IS NOT NULL GROUP BY _k")
        without = self.con.execute("SELECT count(*) FROM patients WHERE _k NOT IN (SELECT _k FROM idx)").fetchone()[0]
        if without:
            self.notes.append(f"{without} patient(s) have no index event (source.index: {ix.rule} row of {ix.table}); "
                              "their windowed variables are missing or not recorded")

    def table_variables(self, t: _Loaded, names: list[str], n_records: int) -> None:
        """Encode, check and reduce the variables read from one table; fill self.columns/reports."""
        m, d = self.m, self.d
        windowed = any(m.variables[n].window_days is not None for n in names) and m.index and m.index.table
        base = f"(SELECT * FROM {t.sql}" + (" LEFT JOIN idx USING (_k)" if windowed else "") + ")"
        exprs: dict[str, tuple[str, str]] = {}  # name -> (value SQL, match SQL)
        joins, numeric, categorical = [], {}, {}
        for j, name in enumerate(names):
            vm, var = m.variables[name], d[name]
            match = f"({self.filter_expr(t, vm.where)} AND {self.window_expr(vm)})"
            if vm.column is None:
                exprs[name] = ("NULL", match)
                continue
            missing = self.missing_expr(t, vm)
            if var.type == "numeric":
                value = f"CASE WHEN {missing} THEN NULL ELSE {self.num_expr(t, vm.column)} END"
                if vm.scale is not None:
                    value = f"(({value}) * {vm.scale!r} + {vm.offset!r})"
                numeric[j] = (vm, match, missing)
            else:
                codes = f"codes{j}"
                joins.append(f"LEFT JOIN {{{codes}}} AS {codes}(code, cell) ON {codes}.code = {self.text_expr(t, vm.column)}")
                value = f"CASE WHEN {missing} THEN NULL ELSE {codes}.cell END"
                categorical[j] = (vm, var, match, missing)
            exprs[name] = (value, match)
        self.check_numbers(t, base, numeric)
        tables = self.category_maps(t, base, categorical)
        joins = [j.format(**tables) for j in joins]
        rows = (f"(SELECT b._r, b._k, b._t, " + ", ".join(f"{v} AS v{j}, {mt} AS m{j}" for j, (v, mt) in
                                                             enumerate(exprs.values()))
                + f" FROM {base} AS b {' '.join(joins)})")
        rows_mode = m.rows_per_patient > 1 and t.spec.name == m.cohort
        if m.patient_key == "row" or rows_mode:  # each record is one row of this table
            cols = ", ".join(f"CASE WHEN m{j} THEN v{j} END AS r{j}" for j in range(len(names)))
            if m.patient_key == "row":
                out = self.con.execute(f"SELECT {cols} FROM {rows} ORDER BY _r").fetchnumpy()
            else:
                out = self.con.execute(f"SELECT {cols} FROM records rec JOIN {rows} AS x USING (_r) "
                                   "ORDER BY rec.pos").fetchnumpy()
            for j, name in enumerate(names):
                self.finish(name, out[f"r{j}"], n_records)
            return
        aggs, checks = [], []
        for j, name in enumerate(names):
            vm = m.variables[name]
            timed = t.spec.time is not None
            valid = f"m{j} AND v{j} IS NOT NULL"
            if vm.reduce in ("first", "last"):
                fn = "arg_min" if vm.reduce == "first" else "arg_max"
                order = "(_t, _r)" if timed else "_r"
                aggs.append(f"{fn}(v{j}, {order}) FILTER (WHERE {valid}{' AND _t IS NOT NULL' if timed else ''}) AS r{j}")
                aggs.append(f"count(*) FILTER (WHERE {valid}{' AND _t IS NULL' if timed else ' AND false'}) AS u{j}")
            elif vm.reduce in ("min", "max"):
                aggs.append(f"{vm.reduce}(v{j}) FILTER (WHERE {valid}) AS r{j}")
            elif vm.reduce == "mean":
                aggs.append(f"avg(v{j}) FILTER (WHERE {valid}) AS r{j}")
            elif vm.reduce == "count":
                aggs.append(f"CAST(count(*) FILTER (WHERE m{j}{f' AND v{j} IS NOT NULL' if vm.column else ''}) AS DOUBLE) AS r{j}")
            elif vm.reduce == "any":
                aggs.append(f"bool_or(m{j}) AS r{j}")
            else:  # no rule: at most one matching row per patient
                aggs.append(f"max(v{j}) FILTER (WHERE {valid}) AS r{j}")
                aggs.append(f"count(*) FILTER (WHERE m{j}) AS n{j}")
                checks.append(j)
        self.con.execute(f"CREATE TEMP TABLE red AS SELECT _k, {', '.join(aggs)} FROM {rows} WHERE _k IS NOT NULL "
                         "GROUP BY _k")
        try:
            self.check_bounded(t, names, checks)
            target = "records" if m.rows_per_patient > 1 else "patients"
            cols = ", ".join(f"red.r{j} AS r{j}" for j in range(len(names)))
            out = self.con.execute(f"SELECT {cols} FROM {target} LEFT JOIN red USING (_k) ORDER BY {target}.pos").fetchnumpy()
            unordered = {}
            for j, name in enumerate(names):
                if m.variables[name].reduce in ("first", "last") and t.spec.time:
                    unordered[name] = int(self.con.execute(f"SELECT coalesce(sum(u{j}), 0) FROM red").fetchone()[0])
        finally:
            self.con.execute("DROP TABLE red")
        for j, name in enumerate(names):
            if unordered.get(name):
                self.notes.append(f"variables.{name}: {unordered[name]} row(s) without a {t.spec.time} were skipped "
                                  f"(reduce = \"{m.variables[name].reduce}\" orders rows by time)")
            self.finish(name, out[f"r{j}"], n_records)

    def check_numbers(self, t: _Loaded, base: str, numeric: dict[int, tuple]) -> None:
        """Refuse the first value (in file order) of each numeric variable that is neither missing nor a number."""
        if not numeric:
            return
        bad = {j: f"{match} AND NOT {missing} AND ({self.num_expr(t, vm.column)} IS NULL OR NOT "
                  f"isfinite({self.num_expr(t, vm.column)}))" for j, (vm, match, missing) in numeric.items()}
        first = self.con.execute(f"SELECT {', '.join(f'min(_r) FILTER (WHERE {b})' for b in bad.values())} "
                                 f"FROM {base}").fetchone()
        found = [(r, j) for r, j in zip(first, bad) if r is not None]
        if not found:
            return
        row, j = min(found)
        vm = numeric[j][0]
        text = self.con.execute(f"SELECT CAST({t.columns[vm.column]} AS VARCHAR) FROM {base} WHERE _r = {row}").fetchone()[0]
        text = text.strip()
        hint = " (a decimal comma? set decimal = \",\" in [source])" if "," in text and t.spec.decimal == "." else ""
        finite = self.con.execute(f"SELECT TRY_CAST({_s(text.replace(',', '.') if t.spec.decimal == ',' else text)} "
                                  "AS DOUBLE) IS NOT NULL").fetchone()[0]
        what = "is not a finite number" if finite else "is not a number"
        raise MappingError(f"{t.where(row, vm.column)} ({vm.where_text.split(': ', 1)[-1]}): {text!r} {what}{hint}")

    def category_maps(self, t: _Loaded, base: str, categorical: dict[int, tuple]) -> dict[str, str]:
        """Per categorical variable, a VALUES table code -> cell for the codes its rows hold (unmapped codes:
        an error naming the first row, or missing / other as the mapping says)."""
        if not categorical:
            return {}
        parts = [f"SELECT {j} AS j, {self.text_expr(t, vm.column)} AS code, _r FROM {base} WHERE {match} AND NOT {missing}"
                 for j, (vm, var, match, missing) in categorical.items()]
        found = self.con.execute(f"SELECT j, code, count(*), min(_r) FROM ({' UNION ALL '.join(parts)}) GROUP BY j, code "
                                 "ORDER BY 4").fetchall()
        pairs: dict[int, list[str]] = {j: [] for j in categorical}
        for j, raw, count, first in found:
            vm, var = categorical[j][0], categorical[j][1]
            report = self.reports.setdefault(vm.name, VariableReport())
            label = vm.label(norm_code(raw), var)
            if label is None:
                if vm.unmapped == "error":
                    raise MappingError(f"{t.where(first, vm.column)} ({vm.where_text.split(': ', 1)[-1]}): code {raw!r} is "
                                       f"not mapped to a category of {var.name!r} (categories: {list(var.categories)}); "
                                       f"add it to variables.{var.name}.values or set unmapped = \"missing\"")
                label = MISSING if vm.unmapped == "missing" else OTHER
                report.unmapped += int(count)
                report.unmapped_codes[raw] = int(count)
            pairs[j].append(f"({_s(raw)}, {'NULL' if label == MISSING else var.cells.index(label)})")
        return {f"codes{j}": (f"(VALUES {', '.join(p)})" if p else "(SELECT NULL AS code, NULL AS cell WHERE false)")
                for j, p in pairs.items()}

    def check_bounded(self, t: _Loaded, names: list[str], checks: list[int]) -> None:
        """Refuse variables without a rule whose patients have several (matching) rows."""
        if not checks:
            return
        cols = ", ".join(f"count(*) FILTER (WHERE n{j} > 1), max(n{j})" for j in checks)
        got = self.con.execute(f"SELECT {cols} FROM red").fetchone()
        over = [(names[j], got[2 * i], got[2 * i + 1]) for i, j in enumerate(checks) if got[2 * i]]
        if not over:
            return
        m = self.m
        worst = max(over, key=lambda x: x[2])
        which = ", ".join(f"variables.{n}" for n, _, _ in over)
        rows_hint = (f", or keep up to k rows per patient as records with [source] rows_per_patient = k (charged k^2 "
                     f"by group privacy)" if t.spec.name == m.cohort else "")
        raise MappingError(
            f"{t.spec.label}: patient key {t.spec.key!r}: {worst[1]} patient(s) have more than one row for "
            f"variables.{worst[0]} (up to {worst[2]} rows); {which} take one value per patient, so this source's "
            f"contributions per patient are not bounded. Declare how to reduce each patient's rows (reduce = \"first\" | "
            f"\"last\" | \"min\" | \"max\" | \"mean\" | \"count\" | \"any\" in the variable){rows_hint}")

    def finish(self, name: str, values: np.ndarray, n_records: int) -> None:
        """Per-record reduced values (masked where none) -> cells, with the report."""
        vm, var = self.m.variables[name], self.d[name]
        report = self.reports.setdefault(name, VariableReport())
        mask, data = np.ma.getmaskarray(values), np.ma.getdata(values)
        if data.dtype == object:  # a column of NULLs only
            mask, data = mask | np.array([v is None for v in data], bool), np.zeros(len(data))
        if vm.reduce == "any":
            hit = data.astype(bool) & ~mask
            cells = np.where(hit, var.cells.index(vm.recorded), var.cells.index(vm.not_recorded))
            report.missing = int((cells == var.cells.index(MISSING)).sum()) if var.missing else 0
            self.columns[name] = cells.astype(np.int32)
            return
        if var.type == "numeric":
            x = np.where(mask, np.nan, data.astype(np.float64))
            if vm.reduce == "count":
                x = np.where(np.isnan(x), 0.0, x)
            x = round_to(x, var.precision)
            cells, oor = bin_values(var, x)
            report.out_of_range = int(oor.sum())
            missing = np.isnan(x)
            report.missing = int(missing.sum()) + (report.out_of_range if var.out_of_range == "missing" else 0)
        else:
            c = np.where(mask, -1, data).astype(np.int64)
            missing = c < 0
            cells = np.where(missing, var.cells.index(MISSING) if var.missing else -1, c)
            report.missing = int(missing.sum())
        if missing.any() and not var.missing:
            why = (f"no row in table {vm.table!r}" + (" matching its where/window" if vm.where or vm.window_days else "")
                   + " or only missing values")
            raise MappingError(f"{vm.where_text}: {int(missing.sum())} of {n_records} record(s) have no value ({why}), "
                               f"and the dictionary declares no missing cell for {name!r}")
        self.columns[name] = np.asarray(cells, np.int32)


def load_site_table(mapping: SiteMapping, dictionary: Dictionary) -> tuple[EncodedTable, ValidationReport]:
    """Read the site's data through its mapping into harmonized cell indices, one entry per record.

    Raises MappingError (naming file, variable and row) for data that do not fit the mapping, and
    for a source whose per-patient contributions are not bounded."""
    if mapping.omop is None:
        return load(mapping, dictionary)
    raw, first_line, notes = omop.read_columns(mapping, dictionary)
    n = len(next(iter(raw.values()))) if raw else 0
    if n == 0:
        raise MappingError(f"{mapping.path}: the table has no data rows")
    cols, reports = {}, {}
    for name, var in dictionary.variables.items():
        vm = mapping.variables[name]
        if vm.absent:
            cols[name] = np.full(n, var.cell_index(MISSING), np.int32)
            reports[name] = VariableReport(missing=n)
            continue
        cols[name], reports[name] = encode_column(raw[vm.column], var, vm, mapping, first_line)
    unit = privacy_unit.PATIENT
    return (EncodedTable(cols, n, unit, 1),
            ValidationReport(mapping.site, str(mapping.path), n, reports, notes, unit, 1))
