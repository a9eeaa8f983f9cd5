"""Cell groupings (domain compression): which dictionary cells a coarsened marginal sums together.

A grouping of a variable maps each of its dictionary cells to a group 0..g-1 (every group used);
None means every cell is its own group. A coarsened marginal is the ordinary contingency table
with each axis summed into its groups, so each record still falls in exactly one cell (the
query's sensitivity is unchanged) and the table only ever carries less detail than the full one.
Plans (public) carry groupings; the guard, the aggregator, the estimator and the reports all use
these functions, so a grouping means the same everywhere.
"""

from __future__ import annotations

import functools
import math
from concurrent import futures
from typing import Mapping, Sequence

import numpy as np

from .procs import usable_cores


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


# `count_tables` walks the rows in blocks of this many; a block's cell indices (8 bytes a row) and
# the joint tables being counted stay in cache while every table of the plan is counted.
COUNT_BLOCK_ROWS = 1 << 16
# Tables whose variables fit together in a joint table of at most this many cells are counted once,
# as that joint table, and read off it by summing (a 2-way table costs a pass over the rows; six
# variables' fifteen 2-way tables then cost about one).
JOINT_CELLS = 1 << 13


def count_tables(columns: Mapping[str, np.ndarray], n_rows: int,
                 tables: Sequence[tuple[Sequence[str], tuple[int, ...], Sequence[np.ndarray | None]]],
                 block_rows: int = COUNT_BLOCK_ROWS, joint_cells: int = JOINT_CELLS) -> list[np.ndarray]:
    """Exact counts of several (grouped) contingency tables over the same rows, in one pass.

    `tables` holds (variable names, grouped shape, groupings) per table, as `check_groups` returns
    them; `columns` maps each variable to its rows' dictionary cell codes. Each result (int64,
    row-major over the grouped shape) equals `np.bincount(grouped_index(...), minlength=cells)`:
    every row adds 1 to exactly one cell of every table. Tables are packed into joint tables of at
    most `joint_cells` cells; the rows are walked once, block by block (large tables: one row range
    per core, on threads), each joint table's flat cell index built with int32 arithmetic in a reused
    buffer and counted with np.bincount; each table is then the sum of its joint table over the
    other variables. Codes outside a variable's
    domain raise ValueError (nothing is counted then).
    """
    axes_of: list[list[tuple]] = []  # per table: (axis key, column, grouping or None, grouped size)
    checked: set[tuple[str, int]] = set()
    for names, shape, maps in tables:
        maps = tuple(maps) if maps else (None,) * len(names)
        if len(maps) != len(names) or len(shape) != len(names):
            raise ValueError("each table needs one grouping (or None) and one grouped size per variable")
        axes = []
        for name, size, g in zip(names, shape, maps):
            col = columns[name]
            g = None if g is None else np.asarray(g, dtype=np.int64)
            full = int(size) if g is None else len(g)
            if len(col) != n_rows:
                raise ValueError(f"column {name!r} has {len(col)} rows, expected {n_rows}")
            if (name, full) not in checked and n_rows:
                if int(col.min()) < 0 or int(col.max()) >= full:
                    raise ValueError(f"column {name!r} holds codes outside its {full} cells")
                checked.add((name, full))
            axes.append(((name, None if g is None else g.tobytes()), col, g, int(size)))
        axes_of.append(axes)
    joints = _pack(axes_of, joint_cells)
    sizes = [math.prod(a[3] for a in axes) for axes in joints]
    # int32 cell indices carry half the memory traffic of int64 (joint tables are far smaller)
    index_type = np.int32 if max(sizes, default=0) < 2**31 else np.int64
    plans = []
    for axes in joints:
        strides = np.cumprod([1] + [a[3] for a in axes[:0:-1]])[::-1]
        plans.append([(col, None if g is None else g.astype(index_type), index_type(s))
                      for (_, col, g, _), s in zip(axes, strides)])
    block_rows = max(1, min(int(block_rows), n_rows or 1))
    spans = _spans(n_rows, block_rows)
    if len(spans) > 1:  # numpy releases the GIL in these loops: one row range per core
        parts = list(_count_pool().map(lambda span: _count_span(plans, sizes, span, block_rows, index_type), spans))
        counts = [np.sum(c, axis=0) for c in zip(*parts)]
    else:
        counts = _count_span(plans, sizes, spans[0] if spans else (0, 0), block_rows, index_type)
    keys = [[a[0] for a in axes] for axes in joints]
    results = []
    for axes in axes_of:
        want = [a[0] for a in axes]
        j = next(i for i, k in enumerate(keys) if set(want) <= set(k))
        joint = counts[j].reshape([a[3] for a in joints[j]])
        other = tuple(i for i, k in enumerate(keys[j]) if k not in want)
        table = joint.sum(axis=other) if other else joint
        kept = [k for k in keys[j] if k in want]
        results.append(np.ascontiguousarray(table.transpose([kept.index(k) for k in want])).reshape(-1))
    return results


# Plans over at least this many rows are counted on several threads, one contiguous row range each.
PARALLEL_COUNT_ROWS = 1 << 18


@functools.lru_cache(maxsize=1)
def _count_pool() -> futures.ThreadPoolExecutor:
    return futures.ThreadPoolExecutor(max_workers=_count_workers(), thread_name_prefix="count")


def _count_workers() -> int:
    return usable_cores()


def _spans(n_rows: int, block_rows: int) -> list[tuple[int, int]]:
    """Row ranges, whole blocks each, one per counting thread (one range below PARALLEL_COUNT_ROWS)."""
    k = min(_count_workers(), max(1, n_rows // PARALLEL_COUNT_ROWS))
    blocks = -(-n_rows // block_rows)
    cuts = [min(n_rows, (blocks * i // k) * block_rows) for i in range(k + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _count_span(plans: list[list[tuple]], sizes: list[int], span: tuple[int, int], block_rows: int,
                index_type: type) -> list[np.ndarray]:
    """Exact counts of each joint table (flat plan of (column, grouping, stride)) over rows [a, b)."""
    counts = [np.zeros(n, dtype=np.int64) for n in sizes]
    index = np.empty(block_rows, dtype=index_type)
    scratch = np.empty(block_rows, dtype=index_type)
    for start in range(span[0], span[1], block_rows):
        stop = min(start + block_rows, span[1])
        idx, tmp = index[:stop - start], scratch[:stop - start]
        for plan, out in zip(plans, counts):
            if len(plan) == 1 and plan[0][1] is None:  # one plain variable: count its codes
                out += np.bincount(plan[0][0][start:stop], minlength=len(out))
                continue
            for k, (col, g, stride) in enumerate(plan):
                part = col[start:stop]
                if g is not None:
                    np.take(g, part, out=tmp)
                    part = tmp
                if k == 0:
                    np.multiply(part, stride, out=idx)
                elif stride == 1:
                    np.add(idx, part, out=idx)
                else:
                    np.multiply(part, stride, out=tmp)
                    np.add(idx, tmp, out=idx)
            out += np.bincount(idx, minlength=len(out))
    return counts


def _pack(axes_of: list[list[tuple]], joint_cells: int) -> list[list[tuple]]:
    """Group tables into joint tables (lists of axes) of at most `joint_cells` cells, greedily: each
    table, largest first, joins the joint table it enlarges least, or starts one."""
    joints: list[dict] = []  # axis key -> axis
    order = sorted(range(len(axes_of)), key=lambda i: -math.prod(a[3] for a in axes_of[i]))
    for i in order:
        axes = {a[0]: a for a in axes_of[i]}
        best, best_cells = next((j for j in joints if axes.keys() <= j.keys()), None), None
        for joint in [] if best is not None else joints:
            cells = math.prod(a[3] for a in (joint | axes).values())
            if cells <= joint_cells and (best_cells is None or cells < best_cells):
                best, best_cells = joint, cells
        if best is None:
            joints.append(dict(axes))
        else:
            best.update(axes)
    return [list(j.values()) for j in joints]


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
