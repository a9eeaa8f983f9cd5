"""What the release report compares: each variable's synthetic shares against the DP aggregate it
was fitted to (with the 95% band of the aggregate's noise), and each site's budget over time
from signed receipts. Post-processing of DP outputs only."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from ...common.dictionary import Dictionary
from ...common.errors import ReleaseError
from ..model.graphical import SITE, Measurement

Z95 = NormalDist().inv_cdf(0.975)  # half-width of a two-sided 95% normal interval, in sd


@dataclass(frozen=True)
class VariableComparison:
    """One variable: synthetic shares against the DP aggregate's shares and their 95% noise band."""

    variable: str
    cells: tuple[str, ...]
    synthetic: np.ndarray  # share of records per cell
    dp: np.ndarray  # share per cell of the DP aggregate (noisy counts / their total)
    half_width: np.ndarray  # 95% half-width of dp from the noise (the total treated as known)
    tables: int  # measured tables combined into the aggregate

    @property
    def inside(self) -> int:
        """Cells whose synthetic share lies inside the band."""
        return int(np.sum(np.abs(self.synthetic - self.dp) <= self.half_width + 1e-12))


def dp_marginal(variable: str, measurements: Sequence[Measurement]) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Noisy counts of one variable and their per-cell noise variance, from every table that contains it.

    Each table is summed down to the variable (variances add: the cells' noise is independent) and
    the tables are combined by inverse variance (their noise draws are independent too). None if no
    completely observed table contains the variable.
    """
    num = den = None
    used = 0
    for m in measurements:
        if variable not in m.variables or not m.complete or m.maps()[m.variables.index(variable)] is not None:
            continue  # a table that groups this variable's cells says nothing about each cell
        axis = m.variables.index(variable)
        others = tuple(i for i in range(m.values.ndim) if i != axis)
        counts = m.values.sum(axis=others)
        var = np.broadcast_to(np.asarray(m.variance, dtype=float), m.values.shape).sum(axis=others)
        if not np.all(var > 0):
            continue
        w = 1.0 / var
        num = w * counts if num is None else num + w * counts
        den = w if den is None else den + w
        used += 1
    if den is None:
        return None
    return num / den, 1.0 / den, used


def _without_site(m: Measurement) -> Measurement | None:
    """The measurement summed over its `site` axis (per-cell variances add); None if a slice is unobserved."""
    if SITE not in m.variables:
        return m
    if not m.complete:
        return None
    axis = m.variables.index(SITE)
    variance = np.broadcast_to(np.asarray(m.variance, dtype=float), m.values.shape).sum(axis=axis)
    groups = m.groups[:axis] + m.groups[axis + 1:] if m.groups is not None else None
    return Measurement(m.variables[:axis] + m.variables[axis + 1:], m.values.sum(axis=axis), variance, groups)


def compare_variables(dictionary: Dictionary, measurements: Sequence[Measurement],
                      samples: np.ndarray) -> list[VariableComparison]:
    """Per dictionary variable: synthetic shares vs the DP aggregate with its 95% band."""
    domain = dictionary.domain()
    for i, m in enumerate(measurements):
        want = tuple(domain.get(v, -1) for v, g in zip(m.variables, m.maps()) if v != SITE and g is None)
        got = tuple(n for v, n, g in zip(m.variables, m.values.shape, m.maps()) if v != SITE and g is None)
        if got != want:
            raise ReleaseError(f"measurement {i} over {[v for v in m.variables if v != SITE]} has shape {got}; "
                               f"the dictionary says {want}")
    measurements = [m for m in map(_without_site, measurements) if m is not None]
    n = max(len(samples), 1)
    out = []
    for j, (name, var) in enumerate(dictionary.variables.items()):
        synth = np.bincount(samples[:, j], minlength=var.size)[: var.size] / n if len(samples) else np.zeros(var.size)
        est = dp_marginal(name, measurements)
        if est is None:
            dp_share, half, used = np.full(var.size, np.nan), np.full(var.size, np.nan), 0
        else:
            counts, variance, used = est
            total = counts.sum()
            if total <= 0:
                total = 1.0
            dp_share, half = counts / total, Z95 * np.sqrt(variance) / total
        out.append(VariableComparison(name, var.cells, synth, dp_share, half, used))
    return out


def budget_history(manifests: Sequence[dict[str, Any]]) -> dict[str, list[tuple[datetime, float, float, float]]]:
    """Per site, its debits as (debited_at, rho spent in total after it, rho limit, rho debited), oldest first.

    Taken from the signed receipts of every manifest given; a receipt in several manifests counts once.
    """
    seen: dict[tuple[str, int], tuple[datetime, float, float, float]] = {}
    for m in manifests:
        for r in m.get("receipts", []):
            try:
                at = datetime.fromisoformat(str(r["debited_at"]).replace("Z", "+00:00"))
                seen[(str(r["site"]), int(r["ledger_seq"]))] = (at, float(r["rho_spent_total"]), float(r["rho_limit"]),
                                                                float(r["rho_debited"]))
            except (KeyError, TypeError, ValueError):
                continue
    out: dict[str, list[tuple[datetime, float, float, float]]] = {}
    for (site, seq), point in sorted(seen.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.setdefault(site, []).append(point)
    return out


