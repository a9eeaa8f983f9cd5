"""Privacy accounting with OpenDP: zCDP composition and conversion to (epsilon, delta).

Privacy unit: one patient record at one site, added or removed. Every marginal is a count
vector whose L2 sensitivity under that unit is 1 (OpenDP's count_by_categories stability map),
released with discrete Gaussian noise of scale sigma, costing rho = 1 / (2 sigma^2) (OpenDP's
privacy map). Releases compose by adding rho. Conversions to (epsilon, delta) use OpenDP's
privacy profile of the composed measurement, which is tighter than the textbook bound.
"""

from __future__ import annotations

import math
from functools import lru_cache

from . import opendp_core as dp

dp.enable_features("contrib")


def _unit_gaussian(scale: float):
    """A discrete Gaussian on an integer query of sensitivity 1: the building block of every marginal."""
    return dp.m.make_gaussian(dp.atom_domain(T=int), dp.absolute_distance(T=int), scale=scale)


def scale_for_rho(rho: float) -> float:
    """Smallest noise scale whose OpenDP privacy map, at sensitivity 1, is at most rho."""
    check_rho(rho)
    scale = math.sqrt(1.0 / (2.0 * rho))
    while _unit_gaussian(scale).map(1) > rho:  # guard against float rounding in the map
        scale = math.nextafter(scale, math.inf) * (1 + 1e-12)
    return scale


def rho_of_scales(scales: list[float]) -> float:
    """zCDP loss of releasing sensitivity-1 queries with these noise scales (OpenDP composition)."""
    if not scales:
        return 0.0
    return float(dp.c.make_composition([_unit_gaussian(s) for s in scales]).map(1))


MIN_SHARE_SCALE = 0.5  # the distributed discrete Gaussian bound assumes every share's sigma >= 1/2


def distributed_rho(share_scale: float, honest: int, cells: int) -> float:
    """zCDP loss of one sensitivity-1 count table (L1 and L2) of `cells` cells when `honest` sites
    each add discrete Gaussian noise of scale `share_scale` and only the sum is seen.

    The distributed discrete Gaussian bound (Kairouz, Liu & Steinke 2021, Proposition 14, as in
    TensorFlow Privacy's accountant): OpenDP's privacy map of one discrete Gaussian at the combined
    scale sqrt(honest) * share_scale, plus the correction for a sum of discrete Gaussians not being
    one, tau / (sqrt(honest) * share_scale) + cells * tau^2 / 2, which is below 1e-15 once the
    share scale is 2 or more. The bound holds for share scales of at least MIN_SHARE_SCALE. With
    one honest site this is exactly OpenDP's map.
    """
    if not (isinstance(honest, int) and honest >= 1 and cells >= 1 and share_scale > 0):
        raise ValueError(f"distributed noise needs honest >= 1 sites, cells >= 1 and a positive scale, got "
                         f"{honest!r}, {cells!r}, {share_scale!r}")
    if honest > 1 and share_scale < MIN_SHARE_SCALE:
        raise ValueError(f"the distributed discrete Gaussian bound needs share scales of at least {MIN_SHARE_SCALE}, "
                         f"got {share_scale!r}")
    combined = math.sqrt(honest) * share_scale
    tau = 10 * math.fsum(math.exp(-2 * math.pi ** 2 * share_scale ** 2 * k / (k + 1)) for k in range(1, honest))
    return float(_unit_gaussian(combined).map(1)) + tau / combined + cells * tau * tau / 2


def honest_shares(parties: int, colluding: int, dropouts: int = 0) -> int:
    """How many noise shares a secure sum's distributed bound counts on: the roster, minus the sites
    that may drop before answering (their shares may be missing from the sum), minus the sites that
    may collude with the coordinator (their shares are known to it). Every site sizes its share for
    this many, so the sum of any n - dropouts survivors still carries the planned noise; the shares
    of further survivors are independent of the data, so the bound holds for them too."""
    honest = parties - dropouts - colluding
    if not (isinstance(honest, int) and honest >= 1 and dropouts >= 0 and colluding >= 0):
        raise ValueError(f"a secure sum of {parties!r} sites tolerating {dropouts!r} dropouts with {colluding!r} "
                         "colluding counts on no site's noise")
    return honest


BOUNDS = ("distributed", "own-noise")  # the two valid bounds on a secure table's loss, as receipts name them


def secure_table_rho(share_scale: float, honest: int, cells: int, own: float | None = None,
                     rows_per_unit: int = 1) -> tuple[float, str]:
    """The loss to charge for one secure table and which bound it is: the smaller of two valid bounds.

    `distributed_rho` counts on the noise of `honest` sites; the site's own noise share alone is
    also a valid bound (everything the other sites add is independent of this site's data, so the
    sum is post-processing of its own noisy table): OpenDP's privacy map of one discrete Gaussian
    at `share_scale` (`own`, if the caller already has it from its measurement). At large rho per
    table the distributed bound's correction can exceed the own-noise map; zCDP composes table by
    table, so charging each table the smaller bound stays sound. With `rows_per_unit` = k records per
    privacy unit, both are the unit's loss: k^2 times the distributed bound by group privacy, and
    the own-noise map at d_in = k (`own` must then be that map).
    """
    k = rows_per_unit
    dist = k * k * distributed_rho(share_scale, honest, cells)
    own = float(_unit_gaussian(share_scale).map(k)) if own is None else float(own)
    return (dist, BOUNDS[0]) if dist <= own else (own, BOUNDS[1])


def combined_bound(bounds: list[str]) -> str:
    """What a receipt states for a plan whose tables were charged with these bounds."""
    kinds = set(bounds)
    return "" if not kinds else kinds.pop() if len(kinds) == 1 else "minimum-per-table"


@lru_cache(maxsize=65536)
def share_scale_for_rho(rho: float, honest: int, cells: int) -> float:
    """Smallest per-site noise scale whose distributed loss (`distributed_rho`) is at most rho.

    Bisection from the bound without its correction (never enough, and within a relative 1e-12
    of the answer once the correction is negligible) until lo and hi are adjacent floats; cached,
    since every site of a plan (and its enrollment and answer) asks the same question."""
    check_rho(rho)
    lo = math.sqrt(1.0 / (2.0 * rho * honest))  # the bound without its correction: never enough
    if honest > 1 and lo < MIN_SHARE_SCALE:
        lo = hi = MIN_SHARE_SCALE
        if distributed_rho(hi, honest, cells) <= rho:
            return hi
    hi, step = lo, 1e-12
    while distributed_rho(hi, honest, cells) > rho:
        lo, hi, step = hi, lo * (1 + step), min(step * 10, 0.1)
    while True:
        mid = (lo + hi) / 2
        if mid <= lo or mid >= hi:
            return hi
        lo, hi = (lo, mid) if distributed_rho(mid, honest, cells) <= rho else (mid, hi)


@lru_cache(maxsize=4096)
def epsilon(rho: float, delta: float) -> float:
    """Epsilon at this delta of a release with total zCDP loss rho (OpenDP privacy profile)."""
    check_delta(delta)
    if rho == 0:
        return 0.0
    check_rho(rho)
    profile = dp.c.make_zCDP_to_approxDP(_unit_gaussian(math.sqrt(1.0 / (2.0 * rho)))).map(1)
    return float(profile.epsilon(delta))


@lru_cache(maxsize=256)
def rho_for_epsilon(eps: float, delta: float) -> float:
    """Largest rho whose (epsilon, delta) conversion stays within eps at delta (to a relative 1e-9).

    Every candidate is checked with OpenDP's privacy profile. The search starts from the textbook
    conversion eps = rho + 2 sqrt(rho ln(1/delta)), which OpenDP's is tighter than (so its rho
    fits), and closes in by safeguarded false position on the noise scale: about ten profile
    evaluations instead of a bisection's eighty (every guard, coordinator and CLI process pays it
    once at start)."""
    check_delta(delta)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {eps!r}")

    def excess(scale: float) -> float:  # OpenDP's epsilon at this unit-sensitivity scale, minus eps
        try:
            return float(dp.c.make_zCDP_to_approxDP(_unit_gaussian(scale)).map(1).epsilon(delta)) - eps
        except dp.OpenDPException:  # rho so large that the profile overflows: certainly too much
            return math.inf

    log_d = math.log(1.0 / delta)
    rho_fit = (math.sqrt(log_d + eps) - math.sqrt(log_d)) ** 2
    fit = math.sqrt(1.0 / (2.0 * rho_fit))  # larger scale: less loss, fits
    f_fit = excess(fit)
    while f_fit > 0:  # never expected (the textbook bound is an upper bound); stay correct anyway
        fit *= 2.0
        f_fit = excess(fit)
    over = fit / 2.0
    f_over = excess(over)
    while f_over <= 0:
        fit, f_fit, over = over, f_over, over / 2.0
        f_over = excess(over)
    side = 0
    for _ in range(200):
        if fit - over <= 1e-10 * fit or -f_fit <= 1e-10 * eps:
            break
        if math.isfinite(f_over):  # false position between the bracket ends (Illinois weighting)
            mid = fit - f_fit * (fit - over) / (f_fit - f_over)
            if not over < mid < fit:
                mid = 0.5 * (fit + over)
        else:
            mid = 0.5 * (fit + over)
        f_mid = excess(mid)
        if f_mid <= 0:
            fit, f_fit = mid, f_mid
            if side == -1:
                f_over /= 2.0
            side = -1
        else:
            over, f_over = mid, f_mid
            if side == 1:
                f_fit /= 2.0
            side = 1
    return float(_unit_gaussian(fit).map(1))


def check_rho(rho: float) -> None:
    if not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be a positive finite number, got {rho!r}")


def check_delta(delta: float) -> None:
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
