"""Unit conversions for harmonizing site measurements onto dictionary units (UCUM codes).

Conversions come from pint (https://pint.readthedocs.io), with UCUM codes and common spellings
translated to pint's names first: `mm[Hg]`, `mg/dL`, `mmol/L`, `umol/L`, `[lb_av]`, `kg`, `Cel`,
`[degF]`, `a` (years: UCUM's annum, never pint's "are"), `mo`, `wk`, `d`, `h`, `min`, `/min`, `%`.
Amount-of-substance units convert to mass units (mmol/L <-> mg/dL, umol/L <-> mg/dL, mmol <-> mg)
with the analyte's molar mass in g/mol, which the dictionary declares as the variable's
`molar_mass`. Every conversion is linear: value_to = value_from * scale + offset.

The pint registry takes a second or two to build, so it is built once and only when a mapping
needs a conversion (identical units never load it).
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from .errors import MappingError

# Spellings sites use, as UCUM codes.
ALIASES = {"degF": "[degF]", "°F": "[degF]", "F": "[degF]", "degC": "Cel", "°C": "Cel", "C": "Cel",
           "lb": "[lb_av]", "lbs": "[lb_av]", "pound": "[lb_av]", "pounds": "[lb_av]", "oz": "[oz_av]",
           "in": "[in_i]", "inch": "[in_i]", "inches": "[in_i]", "ft": "[ft_i]", "mmHg": "mm[Hg]",
           "cmH2O": "cm[H2O]", "years": "a", "year": "a", "yr": "a", "y": "a", "months": "mo", "month": "mo",
           "weeks": "wk", "week": "wk", "days": "d", "day": "d", "hours": "h", "hour": "h",
           "minutes": "min", "minute": "min", "seconds": "s", "second": "s", "bpm": "/min",
           "µmol/L": "umol/L", "μmol/L": "umol/L", "mcmol/L": "umol/L", "mg/dl": "mg/dL", "mmol/l": "mmol/L",
           "umol/l": "umol/L", "g/dl": "g/dL", "g/l": "g/L", "mg/l": "mg/L"}

# UCUM atoms -> pint names (applied to each factor of a unit expression).
_UCUM_TO_PINT = {"mm[Hg]": "mmHg", "cm[H2O]": "cmH2O", "[lb_av]": "lb", "[oz_av]": "oz", "[in_i]": "inch",
                 "[ft_i]": "ft", "Cel": "degC", "[degF]": "degF", "K": "kelvin", "a": "year", "mo": "month",
                 "wk": "week", "d": "day", "h": "hour", "min": "minute", "s": "second", "%": "percent",
                 "1": "dimensionless", "": "dimensionless"}

# Conversions by convention, not physics: (from, to) -> (scale, offset).
_CONVENTIONS: dict[tuple[str, str], tuple[float, float]] = {
    ("mV", "mm"): (10.0, 0.0),  # ECG amplitude at the standard gain of 10 mm/mV
}


def parse_number(text: str, decimal: str = ".") -> float:
    """A finite number from text, or ValueError saying why not (the text quoted, for local messages only)."""
    s = text.strip()
    if decimal != ".":
        s = s.replace(decimal, ".")
    try:
        x = float(s)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{text!r} is not a finite number")
    return x


def canonical(unit: str) -> str:
    """The UCUM code of a unit as a site or a dictionary spells it."""
    return ALIASES.get(unit.strip(), unit.strip())


@lru_cache(maxsize=1)
def _registry():
    import pint

    return pint.UnitRegistry(autoconvert_offset_to_baseunit=True)


_FACTOR = re.compile(r"([^/.()]+)")


def _pint_expression(ucum: str) -> str:
    """A UCUM code as a pint expression: each factor translated, '.' (UCUM's product) as '*'."""
    if ucum in _UCUM_TO_PINT:
        return _UCUM_TO_PINT[ucum]
    expr = re.sub(r"\{[^}]*\}", "", ucum).strip() or "1"  # UCUM annotations: {beats}/min is /min
    if expr in _UCUM_TO_PINT:
        return _UCUM_TO_PINT[expr]
    expr = "1" + expr if expr.startswith("/") else expr
    expr = _FACTOR.sub(lambda m: _UCUM_TO_PINT.get(m.group(1), m.group(1)), expr)
    return expr.replace(".", "*") if not re.search(r"\d\.\d", expr) else expr


def _units(code: str):
    import pint

    try:
        return _registry().parse_units(_pint_expression(code))
    except (pint.errors.PintError, AttributeError, TypeError, ValueError, SyntaxError):
        raise MappingError(f"unknown unit {code!r} (use a UCUM code such as mg/dL, mmol/L, mm[Hg], [lb_av], Cel)") from None


@lru_cache(maxsize=512)
def conversion(src: str, dst: str, molar_mass: float | None = None) -> tuple[float, float]:
    """(scale, offset) turning values in unit `src` into unit `dst`; MappingError if there is none.

    Amount of substance converts to mass (and back) only with the analyte's molar mass in g/mol.
    """
    s, d = canonical(src), canonical(dst)
    if s == d:
        return 1.0, 0.0
    for (a, b), (scale, offset) in _CONVENTIONS.items():
        if (s, d) == (a, b):
            return scale, offset
        if (s, d) == (b, a):
            return 1 / scale, -offset / scale
    if not d:
        raise MappingError(f"the dictionary variable has no unit to convert {src!r} to")
    import pint

    us, ud = _units(s), _units(d)
    Q = _registry().Quantity
    try:
        if us.dimensionality == ud.dimensionality:
            at0, at1 = Q(0.0, us).to(ud).magnitude, Q(1.0, us).to(ud).magnitude
            return float(at1 - at0), float(at0)
        per_mol = Q(1.0, "g/mol")  # amount -> mass multiplies by the molar mass; mass -> amount divides
        for molar in (lambda q, m: q * m, lambda q, m: q / m):
            if molar(Q(1.0, us), per_mol).dimensionality == ud.dimensionality:
                if molar_mass is None:
                    raise MappingError(f"converting {src} to {dst} needs the analyte's molar_mass (g/mol) in the "
                                       "dictionary")
                return float(molar(Q(1.0, us), Q(float(molar_mass), "g/mol")).to(ud).magnitude), 0.0
    except pint.errors.PintError as e:
        raise MappingError(f"cannot convert {src!r} to {dst!r}: {e}") from None
    raise MappingError(f"cannot convert {src!r} ({us.dimensionality}) to {dst!r} ({ud.dimensionality}); check the "
                       f"unit, or give scale/offset in the mapping")


def round_to(x, precision: int):
    """Round half away from zero to `precision` decimals (numbers or numpy arrays).

    Applied to every converted value before binning, so that a conversion does not invent
    precision the dictionary does not have (5.55 mmol/L glucose is 99.99 mg/dL: 100 at precision 0).
    """
    import numpy as np

    f = 10.0 ** precision
    return np.sign(x) * np.floor(np.abs(x) * f + 0.5 + 1e-9) / f
