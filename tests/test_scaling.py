"""minillm.scaling: the power-law fit recovers known laws; the IsoFLOP optimum finds a known minimum."""
import math

import numpy as np
import pytest

from minillm.scaling import PowerLaw, fit_power_law, isoflop_optimum, loss_at_compute


@pytest.mark.parametrize("scale, exponent, offset", [(50.0, 0.3, 2.0), (8.0, 0.05, 1.2), (300.0, 0.5, 0.4)])
def test_fit_recovers_an_exact_power_law_with_offset(scale, exponent, offset):
    compute = np.logspace(4, 10, 12)  # a range where the power-law term is still visible above the offset
    loss = offset + scale * compute ** -exponent
    law = fit_power_law(compute, loss)
    assert law.exponent == pytest.approx(exponent, rel=1e-3)
    assert law.offset == pytest.approx(offset, rel=1e-3, abs=1e-3)
    assert law(compute) == pytest.approx(loss, rel=1e-4)


def test_fit_without_offset_is_exact_in_log_space():
    compute = np.logspace(3, 9, 7)
    law = fit_power_law(compute, 7.0 * compute ** -0.25, offset=False)
    assert law.scale == pytest.approx(7.0, rel=1e-9) and law.exponent == pytest.approx(0.25, rel=1e-9)
    assert law.offset == 0.0


def test_fit_tolerates_noise():
    rng = np.random.default_rng(0)
    compute = np.logspace(12, 18, 20)
    loss = (1.5 + 40.0 * compute ** -0.2) * (1 + 0.003 * rng.standard_normal(compute.size))
    law = fit_power_law(compute, loss)
    assert law.exponent == pytest.approx(0.2, abs=0.03)
    assert law.offset == pytest.approx(1.5, abs=0.1)


def test_a_wrong_exponent_is_worse_than_the_fit():
    compute = np.logspace(10, 16, 9)
    loss = 2.0 + 30.0 * compute ** -0.3
    fitted = fit_power_law(compute, loss)
    wrong = PowerLaw(scale=fitted.scale, exponent=0.35, offset=fitted.offset)
    assert np.abs(wrong(compute) - loss).max() > 100 * np.abs(fitted(compute) - loss).max()


def test_inverse_of_the_law():
    law = PowerLaw(scale=10.0, exponent=0.5, offset=1.0)
    assert law(law.inverse(2.0)) == pytest.approx(2.0)
    assert law.inverse(0.5) == math.inf  # below the irreducible loss


@pytest.mark.parametrize("x, y, message", [([1, 2], [1, 2, 3], "one y per x"), ([1, 1, 1], [3, 2, 1], "distinct"),
                                           ([1, 2, -3], [3, 2, 1], "> 0"), ([1, 2, 3], [3, float("nan"), 1], "finite")])
def test_bad_points_are_clear_errors(x, y, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(x, y)


def test_isoflop_optimum_finds_the_vertex_of_a_parabola_in_log_size():
    sizes = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    losses = 3.0 + 0.2 * (np.log(sizes) - math.log(8e5)) ** 2
    assert isoflop_optimum(sizes, losses) == pytest.approx(8e5, rel=1e-6)
    # monotone losses: the optimum lies outside what was tried, so the best tried size is returned
    assert isoflop_optimum(sizes, [5, 4, 3, 2, 1]) == 1e7


def test_loss_at_compute_interpolates_in_log_compute():
    assert loss_at_compute([1e3, 1e5], [4.0, 2.0], 1e4) == pytest.approx(3.0)
    assert math.isnan(loss_at_compute([1e3, 1e5], [4.0, 2.0], 1e6))


def test_power_law_prints_the_sign_of_its_exponent_and_offset():
    assert str(PowerLaw(2, 0.5, 1.5)) == "2 * x^(-0.5) + 1.5"  # the usual decreasing law is printed as before
    assert str(PowerLaw(2, -0.5)) == "2 * x^(0.5)"
    assert str(PowerLaw(2, 0)) == "2 * x^(0)"
    assert str(PowerLaw(2, 0.5, -1.0)) == "2 * x^(-0.5) - 1"


def test_inverse_of_a_constant_law_is_a_clear_error():
    with pytest.raises(ValueError, match="constant in x"):
        PowerLaw(2, 0).inverse(3)
    with pytest.raises(ValueError, match="constant in x"):
        PowerLaw(0, 0.5, 1.0).inverse(3)
    assert PowerLaw(2, -0.5).inverse(4.0) == pytest.approx(4.0)  # a growing law still inverts


@pytest.mark.parametrize("sizes, message", [([1e5, float("nan"), 1e7], "finite"), ([1e5, 1e6, float("inf")], "finite"),
                                            ([1e5, 0.0, 1e7], "> 0")])
def test_isoflop_optimum_refuses_bad_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        isoflop_optimum(sizes, [3.0, 2.5, 2.8])


@pytest.mark.parametrize("compute, loss, message", [([], [], "at least one point"), ([1e3, 1e5], [4.0], "one loss per"),
                                                    ([1e3], [4.0, 2.0], "one loss per"),
                                                    ([1e3, float("nan")], [4.0, 2.0], "NaN")])
def test_loss_at_compute_refuses_bad_curves(compute, loss, message):
    with pytest.raises(ValueError, match=message):
        loss_at_compute(compute, loss, 1e4)


@pytest.mark.parametrize("compute", [[0.0, 1e3, 1e5], [-1e3, 1e3, 1e5], [1e3, 1e5, float("inf")]])
def test_loss_at_compute_refuses_compute_off_the_log_axis(compute):
    # log(0) and log(-x) used to slip into the interpolation (a warning and a meaningless number).
    with pytest.raises(ValueError, match="finite number > 0"):
        loss_at_compute(compute, [4.0, 3.0, 2.0], 5e4)
