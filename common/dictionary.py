"""The consortium data dictionary: public variables, their domains and sensitivity tiers.

A dictionary is a human-editable TOML file. Every category list and numeric bin edge in it is
public, so every cell of every marginal is known before any data is looked at. Each variable's
domain is an ordered list of *cells*; harmonized site data is stored as cell indices.

    [dictionary]
    name = "..."; version = "1.0.0"
    encounter = "outpatient"  # the kind of encounter each record is (ENCOUNTER_TYPES; FHIR/OMOP exports)
    [variables.age]
    type = "numeric"; unit = "a"; bins = [28, 40, 50, 60, 78]; precision = 0
    out_of_range = "clip"   # or "missing" or "cell" (a declared out_of_range cell)
    missing = true          # a declared missing cell
    tier = 1; description = "..."
    [variables.sex]
    type = "categorical"; categories = ["female", "male"]; missing = false
    [variables.sex.codes]   # optional standard vocabularies (see validate_codes)
    domain = "gender"
    categories = { female = { snomed = "248152002", omop_concept_id = 8532 }, ... }
    [model]
    dependencies = [["age", "sex"], ...]   # optional declared structure

The dictionary's identity is the SHA-256 of its canonical JSON content (comments and layout in
the TOML file do not change it).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DictionaryError

MISSING = "missing"
# [dictionary] encounter: the kind of encounter a record describes -> (FHIR v3-ActCode class, display,
# OMOP CDM Visit concept id). Used by the FHIR Encounter and OMOP visit_occurrence exports.
ENCOUNTER_TYPES = {
    "outpatient": ("AMB", "ambulatory", 9202),          # Outpatient Visit
    "inpatient": ("IMP", "inpatient encounter", 9201),  # Inpatient Visit
    "emergency": ("EMER", "emergency", 9203),           # Emergency Room Visit
    "intensive_care": ("ACUTE", "inpatient acute", 32037),  # Intensive Care
    "home": ("HH", "home health", 581476),              # Home Visit
    "virtual": ("VR", "virtual", 5083),                 # Telehealth
}
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
    def domain(self) -> str:
        """Where the variable goes in FHIR/OMOP exports: codes.domain, else measurement/observation."""
        return self.codes.get("domain") or ("measurement" if self.type == "numeric" else "observation")

    def category_codes(self, label: str) -> dict[str, Any]:
        """Standard codes of one category ({} when it has none)."""
        return self.codes.get("categories", {}).get(label, {})

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
    encounter: str = "outpatient"  # ENCOUNTER_TYPES
    outcome: str | None = None  # [model] outcome: what the records are for (releases weight its pairs)

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
    outcome = raw.get("model", {}).get("outcome")
    if outcome is not None and (not isinstance(outcome, str) or outcome not in variables or variables[outcome].tier >= 3):
        raise DictionaryError(f"{source}: model.outcome must name a variable of the dictionary below tier 3 (tier 3 "
                              f"is released in 1-way tables only), got {outcome!r}")
    for domain in ("age", "gender"):
        holders = [n for n, v in variables.items() if v.codes.get("domain") == domain]
        if len(holders) > 1:
            raise DictionaryError(f"{source}: codes.domain = {domain!r} is declared by {holders}; at most one variable may hold it")
    encounter = head.get("encounter", "outpatient")
    if encounter not in ENCOUNTER_TYPES:
        raise DictionaryError(f"{source}: dictionary.encounter must be one of {sorted(ENCOUNTER_TYPES)}, got {encounter!r}")
    return Dictionary(str(head["name"]), str(head["version"]), variables, tuple(deps), raw, source, encounter, outcome)


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
                  missing=bool(spec.get("missing", True)), unit=str(spec.get("unit", "")))
    if vtype == "categorical":
        cats = spec.get("categories")
        if not isinstance(cats, list) or not cats or not all(isinstance(c, str) and c for c in cats):
            raise DictionaryError(f"{where}.categories: need a non-empty list of strings")
        if len(set(cats)) != len(cats):
            raise DictionaryError(f"{where}.categories: duplicate categories")
        reserved = {MISSING, OTHER, OUT_OF_RANGE} & set(cats)
        if reserved:
            raise DictionaryError(f"{where}.categories: {sorted(reserved)} is reserved for declared cells")
        codes = validate_codes(spec.get("codes", {}), "categorical", tuple(cats), common["unit"], where)
        return Variable(type="categorical", categories=tuple(cats), other=bool(spec.get("other", False)),
                        codes=codes, **common)
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
        codes = validate_codes(spec.get("codes", {}), "numeric", (), common["unit"], where)
        return Variable(type="numeric", bins=tuple(float(b) for b in bins), precision=precision,
                        out_of_range=oor, molar_mass=molar, codes=codes, **common)
    raise DictionaryError(f"{where}.type: must be 'categorical' or 'numeric', got {vtype!r}")


# ---------------------------------------------------------------------------------------------
# Standard vocabularies: the optional [variables.<name>.codes] table.

DOMAINS = ("age", "gender", "measurement", "observation", "condition")
_CODE_KEYS = ("domain", "loinc", "snomed", "icd10cm", "omop_concept_id", "unit_concept_id", "categories")
_CATEGORY_CODE_KEYS = ("snomed", "icd10cm", "loinc", "omop_concept_id")
_ICD10CM = re.compile(r"^[A-TV-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")
_LOINC = re.compile(r"^([0-9]{1,7})-([0-9])$")
_LOINC_ANSWER = re.compile(r"^LA[0-9]{1,8}-[0-9]$")


def validate_codes(raw: Any, vtype: str, categories: tuple[str, ...], unit: str, where: str) -> dict[str, Any]:
    """Check a variable's codes table; return it normalized (SNOMED ids as strings, OMOP ids as ints).

    Variable level: domain (age | gender | measurement | observation | condition), loinc, snomed,
    icd10cm, omop_concept_id, unit_concept_id (numeric only: the OMOP concept of the UCUM `unit`).
    Categorical variables may code each category: categories.<label> = {snomed, icd10cm, loinc
    (an LA answer code), omop_concept_id}. LOINC and SNOMED CT check digits are verified.
    """
    where = f"{where}.codes"
    if not isinstance(raw, dict):
        raise DictionaryError(f"{where}: must be a table")
    unknown = sorted(set(raw) - set(_CODE_KEYS))
    if unknown:
        raise DictionaryError(f"{where}: unknown key(s) {unknown} (allowed: {list(_CODE_KEYS)})")
    out: dict[str, Any] = {}
    domain = raw.get("domain")
    if domain is not None:
        if domain not in DOMAINS:
            raise DictionaryError(f"{where}.domain: must be one of {DOMAINS}, got {domain!r}")
        if domain in ("gender", "condition") and vtype != "categorical":
            raise DictionaryError(f"{where}.domain: {domain!r} needs a categorical variable")
        if domain == "age" and (vtype != "numeric" or unit != "a"):
            raise DictionaryError(f"{where}.domain: 'age' needs a numeric variable in years (unit = \"a\")")
        out["domain"] = domain
    out.update(_check_codes(raw, ("loinc", "snomed", "icd10cm", "omop_concept_id", "unit_concept_id"), where))
    if "unit_concept_id" in out and vtype != "numeric":
        raise DictionaryError(f"{where}.unit_concept_id: only numeric variables have a unit")
    cats = raw.get("categories")
    if cats is not None:
        if vtype != "categorical":
            raise DictionaryError(f"{where}.categories: only categorical variables have categories to code")
        if not isinstance(cats, dict):
            raise DictionaryError(f"{where}.categories: must be a table of category -> codes")
        out["categories"] = {}
        for label, spec in cats.items():
            w = f"{where}.categories.{label}"
            if label not in categories:
                raise DictionaryError(f"{w}: {label!r} is not a category of the variable (categories: {list(categories)})")
            if not isinstance(spec, dict) or not spec:
                raise DictionaryError(f"{w}: must be a non-empty table of codes")
            bad = sorted(set(spec) - set(_CATEGORY_CODE_KEYS))
            if bad:
                raise DictionaryError(f"{w}: unknown key(s) {bad} (allowed: {list(_CATEGORY_CODE_KEYS)})")
            out["categories"][label] = _check_codes(spec, _CATEGORY_CODE_KEYS, w, answer_loinc=True)
    return out


def _check_codes(raw: dict[str, Any], keys: tuple[str, ...], where: str, answer_loinc: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        if key not in raw:
            continue
        value, w = raw[key], f"{where}.{key}"
        if key.endswith("concept_id"):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
                raise DictionaryError(f"{w}: must be a positive integer OMOP concept id, got {value!r}")
            out[key] = value
            continue
        if key == "snomed" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise DictionaryError(f"{w}: must be a string code, got {value!r}")
        if key == "loinc":
            _check_loinc(value, w, answer_loinc)
        elif key == "snomed":
            _check_snomed(value, w)
        elif not _ICD10CM.match(value):
            raise DictionaryError(f"{w}: {value!r} is not an ICD-10-CM code (e.g. 'I25.10')")
        out[key] = value
    return out


def _check_loinc(code: str, where: str, answer_ok: bool) -> None:
    if answer_ok and _LOINC_ANSWER.match(code):
        return
    m = _LOINC.match(code)
    if not m:
        raise DictionaryError(f"{where}: {code!r} is not a LOINC code (digits, '-', check digit, e.g. '2093-3')")
    want = _luhn_check_digit(m.group(1))
    if int(m.group(2)) != want:
        raise DictionaryError(f"{where}: LOINC {code!r} has a wrong check digit (expected {m.group(1)}-{want})")


def _luhn_check_digit(digits: str) -> int:
    """LOINC's mod-10 check digit (the Luhn algorithm)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d // 10 + d % 10
    return (10 - total % 10) % 10


def _check_snomed(code: str, where: str) -> None:
    if not code.isdigit() or not 6 <= len(code) <= 18 or code[0] == "0":
        raise DictionaryError(f"{where}: {code!r} is not a SNOMED CT concept id (6-18 digits)")
    if code[-3:-1] not in ("00", "10"):
        raise DictionaryError(f"{where}: {code!r} is a SNOMED CT id, but not of a concept (partition {code[-3:-1]})")
    if not _verhoeff_ok(code):
        raise DictionaryError(f"{where}: SNOMED CT id {code!r} fails its Verhoeff check digit (a typo?)")


_VD = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
       [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
       [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
       [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
_VP = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
       [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
       [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]


def _verhoeff_ok(code: str) -> bool:
    c = 0
    for i, ch in enumerate(reversed(code)):
        c = _VD[c][_VP[i % 8][int(ch)]]
    return c == 0
