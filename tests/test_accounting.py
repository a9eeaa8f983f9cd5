"""Privacy accounting goes through OpenDP and beats the textbook bound."""

import math

import pytest

from ppsehr.common import accounting


def test_epsilon_round_trip_and_monotone():
    for eps in (0.5, 1.0, 4.0, 8.0):
        rho = accounting.rho_for_epsilon(eps, 1e-6)
        assert accounting.epsilon(rho, 1e-6) == pytest.approx(eps, rel=1e-8)  # the largest rho, not just one that fits
        assert accounting.epsilon(rho, 1e-6) <= eps * (1 + 1e-9)
    assert accounting.epsilon(0.1, 1e-6) < accounting.epsilon(0.2, 1e-6) < accounting.epsilon(0.2, 1e-9)


def test_profile_is_tighter_than_textbook_bound():
    rho = 200 * 0.005
    textbook = rho + 2 * math.sqrt(rho * math.log(1 / 1e-6))
    assert accounting.epsilon(rho, 1e-6) < textbook


def test_scale_for_rho_never_exceeds_rho_and_composition_adds():
    for rho in (1e-4, 0.01, 0.3, 2.0):
        s = accounting.scale_for_rho(rho)
        assert accounting.rho_of_scales([s]) <= rho
        assert accounting.rho_of_scales([s]) == pytest.approx(rho, rel=1e-9)
    s = [accounting.scale_for_rho(r) for r in (0.01, 0.02, 0.03)]
    assert accounting.rho_of_scales(s) == pytest.approx(0.06, rel=1e-9)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_bad_rho_is_rejected(bad):
    with pytest.raises(ValueError, match="rho must be a positive finite number"):
        accounting.scale_for_rho(bad)
