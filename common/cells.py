"""Cell groupings (domain compression): which dictionary cells a coarsened marginal sums together.

A grouping of a variable maps each of its dictionary cells to a group 0..g-1 (every group used);
None means every cell is its own group. A coarsened marginal is the ordinary contingency table
with each axis summed into its groups, so each record still falls in exactly one cell (the
query's sensitivity is unchanged) and the table only ever carries less detail than the full one.
Plans (public) carry groupings; the guard, the aggregator, the estimator and the reports all use
these functions, so a grouping means the same everywhere.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def check_groups(sizes: Sequence[int], groups: Sequence[Sequence[int] | None]) -> tuple[tuple[np.ndarray | None, ...], tuple[int, ...]]:
    """Validate one grouping per variable (empty/None: none) against the variables' domain sizes.

    Returns the groupings as int arrays (None where absent) and the grouped shape. Raises
    ValueError naming the variable's position when a grouping does not fit its domain.
    """
    if groups and len(groups) != len(sizes):
        raise ValueError(f"has {len(groups)} groupings for {len(sizes)} variables (give one per variable, or none)")
    maps: list[np.ndarray | None] = []
    shape = []
    for k, size in enumerate(sizes):
        g = groups[k] if groups else None
        if g is None or len(g) == 0:
            maps.append(None)
            shape.append(size)
            continue
        if len(g) != size:
            raise ValueError(f"variable {k}: grouping has {len(g)} entries for {size} cells")
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in g):
            raise ValueError(f"variable {k}: group numbers must be integers")
        arr = np.asarray(g, dtype=np.int64)
        n = int(arr.max()) + 1
        if arr.min() < 0 or n > size or len(np.unique(arr)) != n:
            raise ValueError(f"variable {k}: groups must be numbered 0..g-1 with every group used")
        maps.append(None if n == size and np.array_equal(arr, np.arange(size)) else arr)
        shape.append(n)
    return tuple(maps), tuple(shape)


def grouped_index(columns: Sequence[np.ndarray], maps: Sequence[np.ndarray | None], shape: tuple[int, ...]) -> np.ndarray:
    """Flat row-major index of each row's grouped cell, from per-variable dictionary cell codes."""
    if not columns:
        return np.zeros(0, dtype=np.int64)
    cols = [c if g is None else g[c] for c, g in zip(columns, maps)]
    return np.ravel_multi_index(cols, shape).astype(np.int64, copy=False)


def _one_hot(g: np.ndarray) -> np.ndarray:
    """(groups x cells) 0/1 matrix of a grouping."""
    m = np.zeros((int(g.max()) + 1, len(g)))
    m[g, np.arange(len(g))] = 1.0
    return m


def project(table: np.ndarray, maps: Sequence[np.ndarray | None]) -> np.ndarray:
    """Sum a table over full domains into the grouped cells (axis by axis)."""
    for k, g in enumerate(maps):
        if g is not None:
            table = np.moveaxis(np.tensordot(_one_hot(g), table, axes=([1], [k])), 0, k)
    return table


def spread(table: np.ndarray, maps: Sequence[np.ndarray | None]) -> np.ndarray:
    """The adjoint of `project`: each grouped cell's value copied to every dictionary cell in it."""
    for k, g in enumerate(maps):
        if g is not None:
            table = np.take(table, g, axis=k)
    return table


def group_labels(cells: Sequence[str], g: np.ndarray | None) -> list[str]:
    """Readable group labels: the member cells joined by ' | '."""
    if g is None:
        return list(cells)
    return [" | ".join(c for c, x in zip(cells, g) if x == j) for j in range(int(g.max()) + 1)]
