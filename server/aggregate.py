"""Check the sites' summaries against the plan and sum them into measurements for the model.

A summed cell carries the sum of the sites' noise variances, so sites are weighted by their
noise, never by an assumed size. A summary that does not match the plan (other dictionary,
other plan, missing or reshaped tables, more rho than asked) is rejected whole, with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..common.dictionary import Dictionary
from ..protos import guard_pb2 as pb
from .model import Measurement


class SummaryRejected(Exception):
    pass


@dataclass(frozen=True)
class SiteResult:
    site: str
    summary: pb.Summary


def check_summary(summary: pb.Summary, plan: pb.QueryPlan, dictionary: Dictionary) -> None:
    """Raise SummaryRejected unless the summary answers exactly this plan over the dictionary's domains."""
    if summary.plan_id != plan.plan_id:
        raise SummaryRejected(f"answers plan {summary.plan_id!r}, not {plan.plan_id!r}")
    if summary.dictionary_hash != dictionary.hash:
        raise SummaryRejected(f"uses dictionary {summary.dictionary_hash!r}, not {dictionary.hash!r}")
    if len(summary.marginals) != len(plan.marginals):
        raise SummaryRejected(f"has {len(summary.marginals)} tables for {len(plan.marginals)} planned marginals")
    total = 0.0
    for i, (got, want) in enumerate(zip(summary.marginals, plan.marginals)):
        shape = tuple(dictionary[v].size for v in want.variables)
        if tuple(got.variables) != tuple(want.variables) or tuple(got.shape) != shape:
            raise SummaryRejected(f"table {i} is over {list(got.variables)} {list(got.shape)}, planned {list(want.variables)} {list(shape)}")
        if len(got.counts) != math.prod(shape):
            raise SummaryRejected(f"table {i} has {len(got.counts)} cells, expected {math.prod(shape)}")
        if not (0 < got.rho <= want.rho * (1 + 1e-9)) or not (got.noise_scale > 0 and math.isfinite(got.noise_scale)):
            raise SummaryRejected(f"table {i} reports rho {got.rho!r} / scale {got.noise_scale!r} for a planned rho of {want.rho!r}")
        total += got.rho
    r = summary.receipt
    if r.site != summary.site or r.plan_id != plan.plan_id or not math.isclose(r.rho_debited, total, rel_tol=1e-9):
        raise SummaryRejected("its budget receipt does not match the summary")


def aggregate(plan: pb.QueryPlan, results: list[SiteResult]) -> list[Measurement]:
    """Sum the sites' noisy tables per planned marginal; variance adds up across sites."""
    if not results:
        raise ValueError("no site answered: nothing to aggregate")
    out = []
    for i, m in enumerate(plan.marginals):
        tables = [r.summary.marginals[i] for r in results]
        shape = tuple(tables[0].shape)
        values = np.sum([np.asarray(t.counts, dtype=np.float64) for t in tables], axis=0).reshape(shape)
        variance = float(sum(t.noise_scale ** 2 for t in tables))
        out.append(Measurement(tuple(m.variables), values, variance))
    return out
