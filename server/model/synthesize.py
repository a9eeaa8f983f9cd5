"""The model stage: fit a graphical model to the DP measurements, sample records from it.

Reads DP outputs only; costs no privacy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ...common.dictionary import Dictionary
from .graphical import SITE, Measurement, Model, estimate, pooled


@dataclass
class Synthesis:
    """The model fitted to the DP aggregates and the records sampled from it (post-processing only)."""

    measurements: list[Measurement]  # the DP outputs the model was fitted to (with a `site` axis if site effects are modelled)
    pooled: list[Measurement]  # the same, summed over sites: what fidelity and reports compare against
    model: Model
    samples: np.ndarray  # (n, V) cell indices, columns in dictionary order
    site_labels: list[str] | None  # the sampled site (group) of each record, when site is a model variable
    groups: list[str]
    seconds: float


def synthesize(dictionary: Dictionary, measurements: list[Measurement], groups: list[str], rows: int | None,
               rng: np.random.Generator) -> Synthesis:
    """Fit the graphical model to the DP measurements and sample records (post-processing only).

    `measurements` may include `derived` tables (margins of tables outside the model): the fit uses
    them, the Synthesis keeps only the DP outputs. `groups`: the site group labels when `site` is a model variable (some measurements have a
    leading `site` axis), else empty. The record total is the inverse-variance estimate from every
    complete table (pooled or per site); only if every table misses some site's slice is it added
    up slice by slice.
    """
    t0 = time.perf_counter()
    labels = list(groups)
    domain = ({SITE: len(labels)} if groups else {}) | dictionary.domain()
    complete = [m for m in measurements if m.complete]
    sliced = [m for m in measurements if m.variables[:1] == (SITE,)]
    model = estimate(domain, measurements, total=None if complete or not sliced else _total_by_slice(sliced))
    n = rows if rows is not None else max(1, int(round(model.total)))
    samples = model.sample(n, rng)
    site_labels = None
    if groups:
        site_labels = [labels[i] for i in samples[:, 0]]
        samples = samples[:, 1:]
    published = [m for m in measurements if not m.derived]  # DP outputs only; derived margins served the fit
    return Synthesis(published, pooled(published), model, samples, site_labels, labels, time.perf_counter() - t0)


def full_domain(syn: Synthesis) -> list[Measurement]:
    """The pooled measurements, each compressed table replaced by the fitted model's marginal over
    its variables (post-processing of DP outputs, same noise variance), for stages that work in
    dictionary cells (the LLM stage)."""
    return [Measurement(m.variables, syn.model.marginal(m.variables), m.variance) if m.coarse else m for m in syn.pooled]


def _total_by_slice(measurements: list[Measurement]) -> float:
    """Record total from tables with a leading site axis: per slice the inverse-variance mean of its
    observed sums, added over slices (a group that missed some rounds still counts)."""
    slices: dict[int, tuple[float, float]] = {}  # slice -> (sum of w * total, sum of w)
    for m in measurements:
        var = np.broadcast_to(m.variance, m.values.shape)
        for g in range(m.values.shape[0]):
            if np.all(np.isfinite(var[g])):
                w = 1.0 / float(var[g].sum())
                a, b = slices.get(g, (0.0, 0.0))
                slices[g] = (a + w * float(m.values[g].sum()), b + w)
    return max(1.0, sum(a / b for a, b in slices.values()))


