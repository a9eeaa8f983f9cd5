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

import opendp.prelude as dp

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
    """Largest rho whose (epsilon, delta) conversion stays within eps at delta."""
    check_delta(delta)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {eps!r}")

    def fits(scale: float) -> bool:
        try:
            return dp.c.make_zCDP_to_approxDP(_unit_gaussian(scale)).map(1).epsilon(delta) <= eps
        except dp.OpenDPException:  # rho so large that the profile overflows: certainly too much
            return False

    scale = dp.binary_search(fits, bounds=(1e-3, 1e7))
    return float(_unit_gaussian(scale).map(1))


def check_rho(rho: float) -> None:
    if not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be a positive finite number, got {rho!r}")


def check_delta(delta: float) -> None:
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
