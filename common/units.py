"""Linear unit conversions for harmonizing site measurements onto dictionary units (UCUM codes)."""

from __future__ import annotations

import math

from .errors import MappingError

# (from, to) -> (scale, offset): value_to = value_from * scale + offset
_LINEAR: dict[tuple[str, str], tuple[float, float]] = {
    ("[degF]", "Cel"): (5 / 9, -32 * 5 / 9),
    ("K", "Cel"): (1.0, -273.15),
    ("[lb_av]", "kg"): (0.45359237, 0.0),
    ("g", "kg"): (0.001, 0.0),
    ("[in_i]", "cm"): (2.54, 0.0),
    ("m", "cm"): (100.0, 0.0),
    ("kPa", "mm[Hg]"): (7.500616827, 0.0),
    ("mV", "mm"): (10.0, 0.0),  # ECG amplitude at standard gain 10 mm/mV
    ("g/L", "mg/dL"): (100.0, 0.0),
    ("mg/L", "mg/dL"): (0.1, 0.0),
    ("s", "min"): (1 / 60, 0.0),
    ("h", "min"): (60.0, 0.0),
    ("mo", "a"): (1 / 12, 0.0),
}
ALIASES = {"degF": "[degF]", "°F": "[degF]", "F": "[degF]", "degC": "Cel", "°C": "Cel", "C": "Cel",
           "lb": "[lb_av]", "lbs": "[lb_av]", "in": "[in_i]", "mmHg": "mm[Hg]", "years": "a",
           "year": "a", "y": "a", "months": "mo", "minutes": "min", "seconds": "s"}


def parse_number(text: str) -> float:
    """A finite number from text, or ValueError saying why not (the text quoted, for local messages only)."""
    try:
        x = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{text!r} is not a finite number")
    return x


def canonical(unit: str) -> str:
    return ALIASES.get(unit.strip(), unit.strip())


def conversion(src: str, dst: str, molar_mass: float | None = None) -> tuple[float, float]:
    """(scale, offset) turning values in unit `src` into unit `dst`.

    mmol/L <-> mg/dL needs the analyte's molar mass (g/mol), declared in the dictionary.
    """
    s, d = canonical(src), canonical(dst)
    if s == d:
        return 1.0, 0.0
    if (s, d) in _LINEAR:
        return _LINEAR[(s, d)]
    if (d, s) in _LINEAR:
        a, b = _LINEAR[(d, s)]
        return 1 / a, -b / a
    if {s, d} == {"mmol/L", "mg/dL"}:
        if molar_mass is None:
            raise MappingError(f"converting {src} to {dst} needs the variable's molar_mass in the dictionary")
        factor = molar_mass / 10.0  # mmol/L * g/mol = mg/L; / 10 -> mg/dL
        return (factor, 0.0) if s == "mmol/L" else (1 / factor, 0.0)
    raise MappingError(f"no known conversion from unit {src!r} to {dst!r}; give scale/offset in the mapping")
