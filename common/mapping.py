"""Site mappings: how one hospital's local table becomes harmonized, integer-encoded columns.

A mapping is a TOML file kept at the site (it may name local file paths and codes):

    [site]
    id = "cleveland"
    [source]
    path = "data/processed.cleveland.data"   # relative to the mapping file
    format = "csv"                           # csv | tsv | parquet (default: from the extension) | omop (common/omop.py)
    header = false                           # csv/tsv: first line holds column names
    columns = ["age", "sex", ...]            # names when there is no header
    missing_values = ["?"]                   # local codes meaning "missing" in every column
    [variables.chol]
    column = "chol"
    missing_values = ["0"]                   # codes meaning "missing" in this column only
    unit = "mmol/L"                          # local unit; converted to the dictionary's unit
    # scale = 38.67, offset = 0.0            # or an explicit linear conversion
    [variables.sex]
    column = "sex"
    values = { "0" = "female", "1" = "male" }  # local code -> dictionary category
    unmapped = "error"                       # or "missing" / "other": what to do with codes not listed
    [variables.slope]
    absent = true                            # the site does not record it: every row is missing

Numeric-looking codes match by value ("1", "1.0" and " 1" are the same code). Empty fields are
missing. Loading yields an EncodedTable (one int32 column of cell indices per dictionary variable)
and a ValidationReport that stays at the site: it may quote local values.
"""

from __future__ import annotations

import csv
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import cells as cell_groups
from . import omop
from .dictionary import MISSING, OTHER, OUT_OF_RANGE, Dictionary, Variable
from .errors import MappingError
from .units import conversion, parse_number

FORMATS = ("csv", "tsv", "parquet", "omop")  # omop: CDM tables, see common/omop.py


def norm_code(value: Any) -> str:
    """Canonical form of a local code: numbers by value, text stripped."""
    s = str(value).strip()
    try:
        f = float(s)
    except ValueError:
        return s
    if math.isnan(f):
        return ""
    return str(int(f)) if f.is_integer() and abs(f) < 2**53 else repr(f)


@dataclass(frozen=True)
class VariableMapping:
    column: str | None
    absent: bool = False
    values: dict[str, str] = field(default_factory=dict)
    missing_values: frozenset[str] = frozenset()
    unmapped: str = "error"
    unit: str | None = None
    scale: float | None = None
    offset: float = 0.0


@dataclass(frozen=True)
class SiteMapping:
    site: str
    path: Path
    format: str
    delimiter: str
    header: bool
    columns: tuple[str, ...]
    missing_values: frozenset[str]
    encoding: str
    variables: dict[str, VariableMapping]
    source: str
    omop: Any = None  # omop.OmopSource when format = "omop"


def load_mapping(path: str | Path, dictionary: Dictionary) -> SiteMapping:
    """Read a site mapping TOML file and check it against the dictionary."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MappingError(f"{path}: mapping file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MappingError(f"{path}: not valid TOML: {e}") from None
    where = str(path)
    site = raw.get("site", {}).get("id")
    if not site or not isinstance(site, str):
        raise MappingError(f"{where}: [site] needs an 'id'")
    src = raw.get("source")
    if not isinstance(src, dict) or not src.get("path"):
        raise MappingError(f"{where}: [source] needs a 'path'")
    data_path = (path.parent / src["path"]).resolve()
    fmt = src.get("format") or {".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}.get(data_path.suffix.lower(), "csv")
    if fmt not in FORMATS:
        raise MappingError(f"{where}: source.format must be one of {FORMATS}, got {fmt!r}")
    delimiter = src.get("delimiter", "\t" if fmt == "tsv" else ",")
    header = bool(src.get("header", True))
    columns = tuple(src.get("columns", ()))
    if fmt != "parquet" and not header and not columns:
        raise MappingError(f"{where}: source.columns is required when header = false")
    vmaps, omop_vars = {}, {}
    raw_vars = raw.get("variables", {})
    for name in raw_vars:
        if name not in dictionary.variables:
            raise MappingError(f"{where}: variables.{name} is not in dictionary {dictionary.name} {dictionary.version}")
    for name, var in dictionary.variables.items():
        spec = raw_vars.get(name)
        if spec is None:
            raise MappingError(f"{where}: dictionary variable {name!r} is not mapped (map it, or declare absent = true)")
        if fmt == "omop" and isinstance(spec, dict) and not spec.get("absent"):
            if "omop" not in spec:
                raise MappingError(f"{where}: variables.{name}: with source.format = \"omop\", define it with "
                                   f"omop = ... (see docs/dictionary.md) or declare absent = true")
            omop_vars[name], vmaps[name] = omop.parse_variable(name, spec, var, f"{where}: variables.{name}")
            continue
        vmaps[name] = _parse_variable_mapping(spec, var, f"{where}: variables.{name}")
    source = omop.OmopSource(data_path, omop.parse_index_rule(src, where), omop_vars) if fmt == "omop" else None
    return SiteMapping(site, data_path, fmt, delimiter, header, columns,
                       frozenset(norm_code(v) for v in src.get("missing_values", [])) | {""},
                       src.get("encoding", "utf-8"), vmaps, where, source)


def _parse_variable_mapping(spec: Any, var: Variable, where: str) -> VariableMapping:
    if not isinstance(spec, dict):
        raise MappingError(f"{where}: must be a table")
    if spec.get("absent"):
        if not var.missing:
            raise MappingError(f"{where}: absent = true, but the dictionary declares no missing cell for it")
        return VariableMapping(column=None, absent=True)
    column = spec.get("column")
    if not isinstance(column, str) or not column:
        raise MappingError(f"{where}: needs 'column' (or absent = true)")
    values = {norm_code(k): str(v) for k, v in spec.get("values", {}).items()}
    if var.type == "categorical":
        allowed = set(var.cells)
        bad = sorted({v for v in values.values() if v not in allowed})
        if bad:
            raise MappingError(f"{where}.values: {bad} are not cells of the dictionary variable (cells: {list(var.cells)})")
    elif values:
        raise MappingError(f"{where}.values: only categorical variables take a value map")
    unmapped = spec.get("unmapped", "error")
    if unmapped not in ("error", "missing", "other"):
        raise MappingError(f"{where}.unmapped: must be error, missing or other")
    if unmapped == "missing" and not var.missing:
        raise MappingError(f"{where}.unmapped = 'missing' needs a missing cell in the dictionary")
    if unmapped == "other" and not var.other:
        raise MappingError(f"{where}.unmapped = 'other' needs other = true in the dictionary")
    unit, scale, offset = spec.get("unit"), spec.get("scale"), float(spec.get("offset", 0.0))
    if var.type == "numeric":
        if scale is None and unit is not None:
            scale, offset = conversion(unit, var.unit, var.molar_mass)
        if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0):
            raise MappingError(f"{where}.scale: must be a finite non-zero number")
    elif unit is not None or scale is not None:
        raise MappingError(f"{where}: unit/scale apply to numeric variables only")
    return VariableMapping(column, False, values, frozenset(norm_code(v) for v in spec.get("missing_values", [])),
                           unmapped, unit, None if scale is None else float(scale), offset)


@dataclass
class EncodedTable:
    """Harmonized site data: for each dictionary variable, the cell index of every row."""

    columns: dict[str, np.ndarray]
    n_rows: int

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

    def to_text(self) -> str:
        lines = [f"site {self.site}: {self.n_rows} rows from {self.path}"]
        for name, r in self.variables.items():
            parts = [f"{r.missing} missing"]
            if r.out_of_range:
                parts.append(f"{r.out_of_range} out of range")
            if r.unmapped:
                codes = ", ".join(f"{c!r} x{k}" for c, k in sorted(r.unmapped_codes.items())[:10])
                parts.append(f"{r.unmapped} unmapped ({codes})")
            lines.append(f"  {name:<16} " + ", ".join(parts))
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def load_site_table(mapping: SiteMapping, dictionary: Dictionary) -> tuple[EncodedTable, ValidationReport]:
    """Read the site's table through its mapping into harmonized cell indices."""
    needed = sorted({vm.column for vm in mapping.variables.values() if vm.column})
    notes: list[str] = []
    if mapping.format == "omop":
        raw, first_line, notes = omop.read_columns(mapping, dictionary)
    else:
        raw, first_line = _read_columns(mapping, needed)
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
        cols[name], reports[name] = _encode_column(raw[vm.column], var, vm, mapping, first_line)
    return EncodedTable(cols, n), ValidationReport(mapping.site, str(mapping.path), n, reports, notes)


def _read_columns(m: SiteMapping, needed: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """Columns as arrays of strings, and the file line number of the first data row."""
    if not m.path.exists():
        raise MappingError(f"{m.source}: data file {m.path} not found")
    if m.format == "parquet":
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(m.path)
        except (pa.ArrowException, OSError) as e:
            raise MappingError(f"{m.path}: cannot read Parquet: {e}") from None
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise MappingError(f"{m.path}: column(s) {missing} not found (columns: {table.column_names})")
        out = {c: pc.fill_null(pc.cast(table[c], pa.string()), "").to_numpy(zero_copy_only=False).astype(str)
               for c in needed}
        return out, 1
    try:
        with open(m.path, newline="", encoding=m.encoding) as f:
            reader = csv.reader(f, delimiter=m.delimiter)
            names = list(m.columns)
            if m.header:
                try:
                    hdr = [h.strip() for h in next(reader)]
                except StopIteration:
                    raise MappingError(f"{m.path}: empty file (expected a header line)") from None
                names = names or hdr
            index = {c: i for i, c in enumerate(names)}
            missing = [c for c in needed if c not in index]
            if missing:
                raise MappingError(f"{m.path}: column(s) {missing} not found (columns: {names})")
            width = len(names)
            rows = []
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != width:
                    raise MappingError(f"{m.path}, line {reader.line_num}: expected {width} fields, found {len(row)}")
                rows.append(row)
    except UnicodeDecodeError as e:
        raise MappingError(f"{m.path}: not {m.encoding} text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise MappingError(f"{m.path}: malformed CSV: {e}") from None
    if not rows:
        return {c: np.array([], dtype=str) for c in needed}, 2 if m.header else 1
    arr = np.array(rows, dtype=str)
    return {c: arr[:, index[c]] for c in needed}, 2 if m.header else 1


def _encode_column(values: np.ndarray, var: Variable, vm: VariableMapping, m: SiteMapping,
                   first_line: int) -> tuple[np.ndarray, VariableReport]:
    uniques, inverse = np.unique(values, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(uniques))
    report = VariableReport()
    codes = np.empty(len(uniques), np.int32)
    missing_codes = m.missing_values | vm.missing_values
    miss = var.cells.index(MISSING) if var.missing else None

    def where(k: int) -> str:
        row = int(np.argmax(inverse == k))
        return f"{m.path}, data row {row + 1} (line {row + first_line}), column {vm.column!r}"

    for k, u in enumerate(uniques):
        code = norm_code(u)
        if code in missing_codes:
            if miss is None:
                raise MappingError(f"{where(k)}: missing value for {var.name!r}, but the dictionary declares no missing cell")
            codes[k], report.missing = miss, report.missing + counts[k]
        elif var.type == "categorical":
            label = vm.values.get(code, code if not vm.values else None)
            if label is None or label not in var.cells or label in (MISSING, OTHER):
                if vm.unmapped == "error":
                    raise MappingError(f"{where(k)}: code {str(u).strip()!r} is not mapped to a category of "
                                       f"{var.name!r} (categories: {list(var.categories)}); add it to "
                                       f"variables.{var.name}.values or set unmapped = \"missing\"")
                label = MISSING if vm.unmapped == "missing" else OTHER
                report.unmapped += counts[k]
                report.unmapped_codes[str(u).strip()] = int(counts[k])
            codes[k] = var.cells.index(label)
        else:
            try:
                x = parse_number(str(u).strip())
            except ValueError as e:
                raise MappingError(f"{where(k)}: {e} (variable {var.name!r})") from None
            if vm.scale is not None:
                x = x * vm.scale + vm.offset
            codes[k], oor = _bin(var, x)
            if oor:
                report.out_of_range += counts[k]
    report.missing = int(report.missing)
    report.out_of_range = int(report.out_of_range)
    report.unmapped = int(report.unmapped)
    if var.type == "numeric" and var.out_of_range == "missing":
        report.missing += report.out_of_range
    return codes[inverse].astype(np.int32), report


def _bin(var: Variable, x: float) -> tuple[int, bool]:
    """Cell index of a numeric value (in dictionary units) and whether it was out of range."""
    lo, hi = var.bins[0], var.bins[-1]
    if lo <= x <= hi:
        i = int(np.searchsorted(var.bins, x, side="right")) - 1
        return min(i, var.n_bins - 1), False
    if var.out_of_range == "clip":
        return (0 if x < lo else var.n_bins - 1), True
    return var.cells.index(OUT_OF_RANGE if var.out_of_range == "cell" else MISSING), True
