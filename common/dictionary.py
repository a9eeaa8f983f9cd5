"""The consortium data dictionary: public variables, their domains and sensitivity tiers.

A dictionary is a human-editable TOML file. Every category list and numeric bin edge in it is
public, so every cell of every marginal is known before any data is looked at. Each variable's
domain is an ordered list of *cells*; harmonized site data is stored as cell indices.

    [dictionary]
    name = "..."; version = "1.0.0"
    [variables.age]
    type = "numeric"; unit = "a"; bins = [28, 40, 50, 60, 78]; precision = 0
    out_of_range = "clip"   # or "missing" or "cell" (a declared out_of_range cell)
    missing = true          # a declared missing cell
    tier = 1; description = "..."
    [variables.sex]
    type = "categorical"; categories = ["female", "male"]; missing = false
    [model]
    dependencies = [["age", "sex"], ...]   # optional declared structure

The dictionary's identity is the SHA-256 of its canonical JSON content (comments and layout in
the TOML file do not change it).
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DictionaryError

MISSING = "missing"
OUT_OF_RANGE = "out_of_range"
OTHER = "other"
TIERS = (1, 2, 3)


@dataclass(frozen=True)
class Variable:
    """One harmonized variable and its public domain."""

    name: str
    type: str  # "categorical" | "numeric"
    description: str = ""
    tier: int = 1
    categories: tuple[str, ...] = ()
    bins: tuple[float, ...] = ()
    unit: str = ""
    precision: int = 0
    missing: bool = True
    out_of_range: str = "clip"  # numeric: clip | missing | cell
    other: bool = False  # categorical: a declared cell for values outside the list
    molar_mass: float | None = None  # g/mol, enables mmol/L <-> mg/dL conversions
    codes: dict[str, Any] = field(default_factory=dict)

    @property
    def cells(self) -> tuple[str, ...]:
        """Ordered cell labels of the public domain."""
        if self.type == "categorical":
            base = list(self.categories) + ([OTHER] if self.other else [])
        else:
            base = [self.bin_label(i) for i in range(len(self.bins) - 1)]
            if self.out_of_range == "cell":
                base.append(OUT_OF_RANGE)
        if self.missing:
            base.append(MISSING)
        return tuple(base)

    @property
    def size(self) -> int:
        return len(self.cells)

    @property
    def n_bins(self) -> int:
        return len(self.bins) - 1

    def cell_index(self, label: str) -> int:
        try:
            return self.cells.index(label)
        except ValueError:
            raise KeyError(f"variable {self.name!r} has no cell {label!r}") from None

    def bin_label(self, i: int) -> str:
        lo, hi = self.bins[i], self.bins[i + 1]
        return f"[{_fmt(lo)},{_fmt(hi)}{']' if i == len(self.bins) - 2 else ')'}"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class Dictionary:
    """The consortium dictionary: an ordered set of variables plus declared model structure."""

    name: str
    version: str
    variables: dict[str, Variable]
    dependencies: tuple[tuple[str, ...], ...]
    content: dict[str, Any]
    source: str = ""

    @property
    def hash(self) -> str:
        canon = json.dumps(self.content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()

    @property
    def names(self) -> list[str]:
        return list(self.variables)

    def __getitem__(self, name: str) -> Variable:
        try:
            return self.variables[name]
        except KeyError:
            raise DictionaryError(f"unknown variable {name!r} (dictionary {self.name} {self.version})") from None

    def domain(self, names: list[str] | tuple[str, ...] | None = None) -> dict[str, int]:
        """Cells per variable, in dictionary order (or the order given)."""
        names = self.names if names is None else names
        return {n: self[n].size for n in names}

    def to_json(self) -> dict[str, Any]:
        return self.content


def load_dictionary(path: str | Path) -> Dictionary:
    """Read and validate a dictionary TOML file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DictionaryError(f"{path}: dictionary file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DictionaryError(f"{path}: not valid TOML: {e}") from None
    return parse_dictionary(raw, source=str(path))


def parse_dictionary(raw: dict[str, Any], source: str = "<dictionary>") -> Dictionary:
    """Validate parsed dictionary content."""
    head = raw.get("dictionary", {})
    if not isinstance(head, dict) or not head.get("name") or not head.get("version"):
        raise DictionaryError(f"{source}: [dictionary] needs 'name' and 'version'")
    vars_raw = raw.get("variables")
    if not isinstance(vars_raw, dict) or not vars_raw:
        raise DictionaryError(f"{source}: no [variables.<name>] tables")
    variables = {name: _parse_variable(name, spec, source) for name, spec in vars_raw.items()}
    deps = []
    for i, dep in enumerate(raw.get("model", {}).get("dependencies", [])):
        if not isinstance(dep, list) or not 2 <= len(dep) <= 3:
            raise DictionaryError(f"{source}: model.dependencies[{i}] must list 2 or 3 variables")
        for n in dep:
            if n not in variables:
                raise DictionaryError(f"{source}: model.dependencies[{i}] names unknown variable {n!r}")
        deps.append(tuple(dep))
    return Dictionary(str(head["name"]), str(head["version"]), variables, tuple(deps), raw, source)


_VAR_KEYS = {"type", "description", "tier", "categories", "bins", "unit", "precision", "missing",
             "out_of_range", "other", "molar_mass", "codes"}


def _parse_variable(name: str, spec: Any, source: str) -> Variable:
    where = f"{source}: variables.{name}"
    if not isinstance(spec, dict):
        raise DictionaryError(f"{where}: must be a table")
    unknown = set(spec) - _VAR_KEYS
    if unknown:
        raise DictionaryError(f"{where}: unknown key(s) {sorted(unknown)}")
    vtype = spec.get("type")
    tier = spec.get("tier", 1)
    if tier not in TIERS:
        raise DictionaryError(f"{where}.tier: must be one of {TIERS}, got {tier!r}")
    common = dict(name=name, description=str(spec.get("description", "")), tier=tier,
                  missing=bool(spec.get("missing", True)), unit=str(spec.get("unit", "")),
                  codes=dict(spec.get("codes", {})))
    if vtype == "categorical":
        cats = spec.get("categories")
        if not isinstance(cats, list) or not cats or not all(isinstance(c, str) and c for c in cats):
            raise DictionaryError(f"{where}.categories: need a non-empty list of strings")
        if len(set(cats)) != len(cats):
            raise DictionaryError(f"{where}.categories: duplicate categories")
        reserved = {MISSING, OTHER, OUT_OF_RANGE} & set(cats)
        if reserved:
            raise DictionaryError(f"{where}.categories: {sorted(reserved)} is reserved for declared cells")
        return Variable(type="categorical", categories=tuple(cats), other=bool(spec.get("other", False)), **common)
    if vtype == "numeric":
        bins = spec.get("bins")
        if (not isinstance(bins, list) or len(bins) < 2
                or not all(isinstance(b, (int, float)) and math.isfinite(b) for b in bins)
                or any(b >= c for b, c in zip(bins, bins[1:]))):
            raise DictionaryError(f"{where}.bins: need at least 2 finite, strictly increasing edges")
        oor = spec.get("out_of_range", "clip")
        if oor not in ("clip", "missing", "cell"):
            raise DictionaryError(f"{where}.out_of_range: must be clip, missing or cell, got {oor!r}")
        if oor == "missing" and not common["missing"]:
            raise DictionaryError(f"{where}: out_of_range = 'missing' needs missing = true")
        molar = spec.get("molar_mass")
        if molar is not None and (not isinstance(molar, (int, float)) or molar <= 0):
            raise DictionaryError(f"{where}.molar_mass: must be a positive number (g/mol)")
        precision = spec.get("precision", 0)
        if not isinstance(precision, int) or not 0 <= precision <= 6:
            raise DictionaryError(f"{where}.precision: must be an integer 0-6")
        return Variable(type="numeric", bins=tuple(float(b) for b in bins), precision=precision,
                        out_of_range=oor, molar_mass=molar, **common)
    raise DictionaryError(f"{where}.type: must be 'categorical' or 'numeric', got {vtype!r}")
