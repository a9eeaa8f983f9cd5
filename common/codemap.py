"""How one site's local values map onto one dictionary variable: local codes normalised, `values`
targets checked against the dictionary, and the per-variable mapping record every source type
(files, databases, OMOP CDM) produces. A leaf of the mapping modules: it imports none of them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from .dictionary import MISSING, OTHER, Variable
from .errors import MappingError, did_you_mean


def check_keys(table: Any, known: Sequence[str], where: str, what: str = "key") -> None:
    """Refuse keys of a TOML table that are not in `known`, naming each and the closest known key."""
    if not isinstance(table, dict):
        raise MappingError(f"{where}: must be a table")
    for key in table:
        if key not in known:
            raise MappingError(f"{where}: unknown {what} {key!r}" + did_you_mean(key, known, f"known: {', '.join(known)}"))


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
    values: dict[str, str] = field(default_factory=dict)  # normalized local code -> category | missing | other
    missing_values: frozenset[str] = frozenset()
    unmapped: str = "error"
    unit: str | None = None
    scale: float | None = None
    offset: float = 0.0
    table: str = ""  # the source table it is read from
    where: tuple[tuple[str, tuple[str, ...]], ...] = ()  # only rows whose column holds one of these codes
    reduce: str | None = None  # how a patient's rows become one value (None: at most one row each)
    window_days: tuple[float, float] | None = None  # rows this many days from the index event
    recorded: str = ""  # reduce = "any": the category of patients with a matching row ...
    not_recorded: str = ""  # ... and of the others ("missing" allowed)
    name: str = ""  # dictionary variable
    where_text: str = ""  # "file: variables.<name>", for messages

    def label(self, code: str, var: Variable) -> str | None:
        """The cell label of a normalized local code: listed, else the code itself if it is a category."""
        if code in self.values:
            return self.values[code]
        return code if code in var.categories else None


def check_target(label: Any, code: str, var: Variable, where: str) -> str:
    """A `values` target: a category, or the keywords missing / other when the dictionary declares that cell."""
    if not isinstance(label, str):
        raise MappingError(f"{where}: code {code!r} maps to {label!r}; targets are category names (strings)")
    if label in var.categories:
        return label
    if label == MISSING:
        if not var.missing:
            raise MappingError(f"{where}: code {code!r} maps to \"missing\", but the dictionary declares no missing "
                               f"cell for {var.name!r}")
        return label
    if label == OTHER:
        if not var.other:
            raise MappingError(f"{where}: code {code!r} maps to \"other\", but the dictionary declares no other cell "
                               f"for {var.name!r} (other = true)")
        return label
    keywords = [MISSING] * var.missing + [OTHER] * var.other
    hint = did_you_mean(label, list(var.categories) + keywords)
    raise MappingError(f"{where}: code {code!r} maps to {label!r}, which is not a category of {var.name!r}{hint} "
                       f"(categories: {list(var.categories)}" + (f"; or {' / '.join(keywords)}" if keywords else "") + ")")
