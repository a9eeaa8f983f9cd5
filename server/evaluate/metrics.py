"""Evaluation figures from noisy count tables, each with the noise it carries (post-processing only).

Every function takes noisy counts summed over sites and their per-cell noise variance (the sum of
the sites' noise scales squared) and returns a figure and its noise: a delta-method standard
deviation for smooth figures (AUC, accuracy, shares, means), and for a TVD a bound that holds with
high probability. Negative noisy counts are clipped to 0 first. Nothing here draws noise.
"""

from __future__ import annotations

import math

import numpy as np

NORMAL_L1 = math.sqrt(2 / math.pi)  # E|Z| for a standard normal


def _clip(x) -> np.ndarray:
    return np.clip(np.asarray(x, dtype=np.float64), 0, None)


def _sd(gradients: list[np.ndarray], variances: list) -> float:
    return float(math.sqrt(math.fsum(float(np.sum(g * g * np.broadcast_to(v, g.shape))) for g, v in zip(gradients, variances))))


def auc(negative, positive, var_negative, var_positive) -> tuple[float | None, float | None]:
    """Area under the ROC curve from score histograms (bins in increasing score), ties counted half,
    and its delta-method standard deviation. (None, None) if a class is empty."""
    n, p = _clip(negative), _clip(positive)
    big_n, big_p = float(n.sum()), float(p.sum())
    if big_n <= 0 or big_p <= 0:
        return None, None
    below = np.cumsum(n) - n  # negatives in lower bins
    above = p.sum() - np.cumsum(p)  # positives in higher bins
    value = float(np.sum(p * (below + n / 2)) / (big_p * big_n))
    d_p = (below + n / 2) / (big_p * big_n) - value / big_p
    d_n = (above + p / 2) / (big_p * big_n) - value / big_n
    return value, _sd([d_p, d_n], [var_positive, var_negative])


def accuracy(negative, positive, var_negative, var_positive) -> tuple[float | None, float | None]:
    """Share of rows classified right at score 0.5 (the upper half of the bins is "positive")."""
    n, p = _clip(negative), _clip(positive)
    total = float(n.sum() + p.sum())
    if total <= 0:
        return None, None
    half = len(n) // 2
    right_n, right_p = np.arange(len(n)) < half, np.arange(len(p)) >= half
    value = float((n[right_n].sum() + p[right_p].sum()) / total)
    return value, _sd([(right_n - value) / total, (right_p - value) / total], [var_negative, var_positive])


def share(counts, variance, selected) -> tuple[float | None, float | None]:
    """counts[selected].sum() / counts.sum() and its standard deviation."""
    c = _clip(counts)
    total = float(c.sum())
    if total <= 0:
        return None, None
    mask = np.asarray(selected, dtype=bool)
    value = float(c[mask].sum() / total)
    return value, _sd([(mask - value) / total], [variance])


def ratio(count: float, var_count: float, counts, variance) -> tuple[float | None, float | None]:
    """A separately counted number over the total of a table (e.g. unique copies per real row)."""
    c = _clip(counts)
    total = float(c.sum())
    if total <= 0:
        return None, None
    value = max(float(count), 0.0) / total
    return value, float(math.sqrt(var_count / total ** 2 + value ** 2 * float(np.sum(np.broadcast_to(variance, c.shape))) / total ** 2))


def mean_index(counts, variance) -> tuple[float | None, float | None]:
    """Mean of the cell index under the clipped histogram (e.g. mean distance) and its standard deviation."""
    c = _clip(counts)
    total = float(c.sum())
    if total <= 0:
        return None, None
    k = np.arange(len(c), dtype=np.float64)
    value = float(np.sum(k * c) / total)
    return value, _sd([(k - value) / total], [variance])


def tvd(synthetic_shares, noisy_counts, variance) -> tuple[float | None, float | None]:
    """Total variation distance between the records' shares and the noisy real table (clipped,
    normalised), and a bound on how far noise can have moved it: |TVD(noisy) - TVD(exact)| is at
    most ||noise||_1 / (noisy total), and ||noise||_1 is below E + 3 sd (Gaussian approximation)."""
    r = _clip(noisy_counts).ravel()
    total = float(r.sum())
    if total <= 0:
        return None, None
    value = float(0.5 * np.abs(np.asarray(synthetic_shares, dtype=np.float64).ravel() - r / total).sum())
    var = np.broadcast_to(np.asarray(variance, dtype=np.float64), r.shape)
    l1 = float(np.sum(np.sqrt(var)) * NORMAL_L1 + 3 * math.sqrt(float(np.sum(var)) * (1 - 2 / math.pi)))
    return value, l1 / total


def membership_advantage_bound(epsilon: float, delta: float) -> float:
    """Largest TPR - FPR any membership test can reach against an (epsilon, delta)-DP release
    (Kairouz, Oh & Viswanath 2015: TPR <= e^eps FPR + delta and 1 - FPR <= e^eps (1 - TPR) + delta)."""
    return float((math.expm1(epsilon) + 2 * delta) / (math.exp(epsilon) + 1))
