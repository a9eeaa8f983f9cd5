"""Turn sampled cell indices into records in the dictionary's vocabulary.

Categorical cells become their labels; a numeric bin becomes a value drawn uniformly from the
grid of values representable at the variable's precision inside the bin (so a bin [0, 0.1) at
precision 1 yields 0.0 only). Missing cells become empty fields.
"""

from __future__ import annotations

import csv
import io
import math

from typing import Sequence

import numpy as np

from ...common.dictionary import MISSING, OUT_OF_RANGE, Dictionary, Variable


def _numeric_values(var: Variable, cells: np.ndarray, rng: np.random.Generator) -> list[str]:
    step = 10.0 ** -var.precision
    out = np.empty(len(cells), dtype=object)
    labels = var.cells
    for k in np.unique(cells):
        idx = np.flatnonzero(cells == k)
        if k < var.n_bins:
            lo, hi = var.bins[k], var.bins[k + 1]
            first = math.ceil(round(lo / step, 9))
            last = math.floor(round(hi / step, 9)) if k == var.n_bins - 1 else math.ceil(round(hi / step, 9)) - 1
            grid = np.arange(first, max(last, first) + 1) * step
            draws = grid[rng.integers(0, len(grid), size=len(idx))]
            out[idx] = [f"{x:.{var.precision}f}" for x in draws]
        else:
            out[idx] = "" if labels[k] == MISSING else labels[k]
    return out.tolist()


def decode(samples: np.ndarray, dictionary: Dictionary, rng: np.random.Generator) -> dict[str, list[str]]:
    """Columns of string values, one per dictionary variable, from an (n, V) array of cell indices."""
    cols = {}
    for j, (name, var) in enumerate(dictionary.variables.items()):
        cells = samples[:, j]
        if var.type == "numeric":
            cols[name] = _numeric_values(var, cells, rng)
        else:
            labels = np.array(["" if c == MISSING else c for c in var.cells], dtype=object)
            cols[name] = labels[cells].tolist()
    return cols


def to_csv(columns: dict[str, list[str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(zip(*columns.values()))
    return buf.getvalue().encode()


def cell_of(var: Variable, value: str) -> int:
    """Cell index of an in-domain record value."""
    if value == "":
        return var.cell_index(MISSING)
    if var.type == "categorical" or value == OUT_OF_RANGE:
        return var.cell_index(value)
    x = float(value)
    i = int(np.searchsorted(var.bins, x, side="right")) - 1
    return min(max(i, 0), var.n_bins - 1)


def encode(dictionary: Dictionary, columns: dict[str, Sequence[str]]) -> np.ndarray:
    """(n, V) cell indices of records given as string columns (dictionary order)."""
    n = len(next(iter(columns.values()))) if columns else 0
    out = np.zeros((n, len(dictionary.names)), dtype=np.int64)
    for j, (name, var) in enumerate(dictionary.variables.items()):
        cache: dict[str, int] = {}
        col = columns[name]
        for i in range(n):
            v = col[i]
            if v not in cache:
                cache[v] = cell_of(var, v)
            out[i, j] = cache[v]
    return out
