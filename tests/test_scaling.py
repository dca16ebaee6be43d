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


# ---- robustness: awkward or bad input either fits correctly or is a clear error naming the function ----

def test_fit_handles_subnormal_losses():
    # y - c underflowed to 0 for losses near the smallest float (5e-324): log(0) turned the whole fit into NaN.
    compute = np.logspace(4, 10, 12)
    law = fit_power_law(compute, 1e-320 * (2.0 + 50.0 * compute ** -0.3))
    assert law.exponent == pytest.approx(0.3, abs=0.01)
    assert law.offset == pytest.approx(2e-320, rel=0.02) and law.scale == pytest.approx(5e-319, rel=0.05)


def test_fit_handles_huge_compute_in_logs():
    compute = np.logspace(0, 3, 8)
    law = fit_power_law(compute * 1e100, 2.0 + 50.0 * compute ** -2.0)  # a = 50 * (1e100)^2
    assert law.scale == pytest.approx(5e201, rel=1e-6) and law.exponent == pytest.approx(2.0, rel=1e-6)
    assert law.offset == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("offset", [True, False])
def test_fit_refuses_a_scale_beyond_the_float_range(offset):
    # a = 50 * (1e300)^2 = 5e601: math.exp used to raise a bare OverflowError ("math range error")
    compute = np.logspace(0, 3, 8)
    with pytest.raises(ValueError, match="fit_power_law: the fitted scale .* outside the float range.*units"):
        fit_power_law(compute * 1e300, 2.0 * offset + 50.0 * compute ** -2.0, offset=offset)


@pytest.mark.parametrize("offset", [True, False])
def test_fit_of_flat_data_is_exactly_the_constant_law(offset):
    # all losses equal: the fit used to return an exponent of about -1.7e-18, printed as x^(1.67e-18)
    law = fit_power_law(np.logspace(4, 10, 12), np.full(12, 2.5), offset=offset)
    assert law == PowerLaw(scale=2.5, exponent=0.0, offset=0.0)
    assert law(1e20) == 2.5


def test_fit_counts_x_values_that_coincide_in_log_as_one():
    # 1e300 and the next float are distinct, but their logs are equal: the line through them was nonsense
    with pytest.raises(ValueError, match="fit_power_law: 1 distinct x value.*float precision.*at least 2"):
        fit_power_law([1e300, np.nextafter(1e300, 2e300)], [3.0, 2.0], offset=False)


def test_fit_of_no_points_says_so():
    with pytest.raises(ValueError, match="fit_power_law: got no points"):
        fit_power_law([], [])


@pytest.mark.parametrize("x", [["1e3", "1e4", "1e5"], [1e3, True, 1e5], [1e3, 1e4, 3j], [1e3, 1e4, None], "1e3",
                               np.array([1e3, 1e4, 1e5]).astype(str), np.array([1, 0, 1], dtype=bool), {1e3, 1e4, 1e5}])
def test_fit_refuses_what_only_looks_like_numbers(x):
    # strings used to be parsed silently, True counted as 1.0 and None as NaN
    with pytest.raises(TypeError, match="fit_power_law: x (is|holds) .*not a real number; pass ints or floats"):
        fit_power_law(x, [3.0, 2.0, 1.5])


def test_fit_refuses_a_number_too_large_for_a_float():
    with pytest.raises(ValueError, match="fit_power_law: x has .*too large for a float"):
        fit_power_law([10 ** 400, 1e4, 1e5], [3.0, 2.0, 1.5])


def test_fit_refuses_tables_of_points():
    # a 2x3 and a 3x2 array used to be flattened and paired element by element
    with pytest.raises(ValueError, match=r"fit_power_law: x has shape \(2, 3\); pass a flat list"):
        fit_power_law(np.arange(1.0, 7.0).reshape(2, 3), np.arange(6.0, 0.0, -1.0).reshape(3, 2))
    column = fit_power_law(np.logspace(3, 9, 7)[:, None], 7.0 * np.logspace(3, 9, 7) ** -0.25, offset=False)
    assert column.exponent == pytest.approx(0.25, rel=1e-9)  # a single column is still a list of points


@pytest.mark.parametrize("offset", [2.0, "no", None, 0])
def test_fit_refuses_an_offset_that_is_not_a_bool(offset):
    # offset=2.0 (meant as "c = 2") used to be read as True and fit c instead
    with pytest.raises(TypeError, match="fit_power_law: offset=.* must be True or False"):
        fit_power_law([1e3, 1e4, 1e5], [3.0, 2.0, 1.5], offset=offset)


def test_fit_reads_torch_tensors_that_need_grad():
    torch = pytest.importorskip("torch")
    compute, loss = [1e3, 1e4, 1e5, 1e6], [3.0, 2.0, 1.5, 1.3]
    expected = fit_power_law(compute, loss)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64, requires_grad=True)  # noqa: E731
    assert fit_power_law(as_tensor(compute), torch.tensor(loss, dtype=torch.float64)) == expected
    assert fit_power_law([as_tensor(c) for c in compute], tuple(loss)) == expected
    half = fit_power_law(torch.tensor(compute, dtype=torch.bfloat16), torch.tensor(loss, dtype=torch.bfloat16))
    assert half(1e4) == pytest.approx(expected(1e4), rel=0.02)  # numpy has no bfloat16: it used to be a TypeError
    with pytest.raises(TypeError, match="fit_power_law: x holds bool"):
        fit_power_law(torch.tensor([True, False, True]), loss[:3])


@pytest.mark.parametrize("law", [PowerLaw(10.0, 0.5, 1.0), PowerLaw(2.0, -0.5, 1.0), PowerLaw(-2.0, 0.5, 1.0),
                                 PowerLaw(-2.0, -0.5, 10.0)])
def test_inverse_round_trips_for_every_sign_of_scale_and_exponent(law):
    for x in (0.5, 4.0, 1e3):
        assert law.inverse(law(x)) == pytest.approx(x, rel=1e-9)


def test_inverse_of_a_growing_law_outside_its_range():
    # 1 + 2 * x^0.5 starts at 1 at x = 0 and grows: y = 1 is reached at x = 0, y < 1 never (it used to return inf)
    law = PowerLaw(2.0, -0.5, 1.0)
    assert law.inverse(1.0) == 0.0
    with pytest.raises(ValueError, match="PowerLaw.inverse: .* stays above its offset 1 .*no x reaches y=0.5"):
        law.inverse(0.5)
    with pytest.raises(ValueError, match="stays below its offset 10 .*ask for a y below 10"):
        PowerLaw(-2.0, -0.5, 10.0).inverse(11.0)
    assert PowerLaw(-2.0, 0.5, 1.0).inverse(1.5) == math.inf  # rises towards 1 as x grows, never past it


def test_inverse_beyond_the_float_range_is_inf():
    # x = 1e10000: Python's float power used to raise OverflowError
    assert PowerLaw(1.0, 1e-3).inverse(1e-10) == math.inf


@pytest.mark.parametrize("y, error, message", [(float("nan"), ValueError, "y=nan must be a finite number"),
                                               (float("inf"), ValueError, "y=inf must be a finite number"),
                                               ("2", TypeError, "y is str '2', not a real number"),
                                               (True, TypeError, "y is bool True"),
                                               ([2.0], TypeError, "y must be one number")])
def test_inverse_refuses_a_bad_target(y, error, message):
    with pytest.raises(error, match=f"PowerLaw.inverse: {message}"):
        PowerLaw(10.0, 0.5, 1.0).inverse(y)


@pytest.mark.parametrize("x", [0.0, -1.0, float("nan"), [4.0, 0.0]])
def test_power_law_refuses_x_at_or_below_zero(x):
    # x = 0 used to give inf and x < 0 NaN, each with a RuntimeWarning
    with pytest.raises(ValueError, match="PowerLaw: x=.* is not > 0"):
        PowerLaw(10.0, 0.5, 1.0)(x)


def test_power_law_overflows_to_inf_quietly_and_reaches_its_offset_at_infinity():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PowerLaw(1.0, 2.0)(1e-300) == math.inf
        assert PowerLaw(0.0, -0.5, 1.0)(math.inf) == 1.0  # 0 * inf used to make this NaN
        assert PowerLaw(3.0, 0.5, 1.0)(math.inf) == 1.0


@pytest.mark.parametrize("fields, error, message", [((math.nan, 0.5), ValueError, "scale=nan must be a finite"),
                                                    ((1.0, math.inf), ValueError, "exponent=inf must be a finite"),
                                                    ((1.0, 0.5, "2"), TypeError, "offset is str"),
                                                    ((True, 0.5), TypeError, "scale is bool")])
def test_power_law_refuses_bad_numbers(fields, error, message):
    with pytest.raises(error, match=f"PowerLaw: {message}"):
        PowerLaw(*fields)


def test_power_law_stores_floats_and_still_evaluates_arrays():
    law = PowerLaw(np.float32(10), 1, np.int64(1))
    assert type(law.scale) is float and type(law.exponent) is float and type(law.offset) is float
    assert law(4) == 3.5 and law([[1.0, 10.0]]) == pytest.approx(np.array([[11.0, 2.0]]))


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), 0.0, -1e4])
def test_loss_at_compute_refuses_a_budget_off_the_log_axis(budget):
    # each of these used to return NaN, as if the budget were merely outside the curve
    with pytest.raises(ValueError, match=r"loss_at_compute: budget=.* must be a finite number of FLOPs > 0"):
        loss_at_compute([1e3, 1e5], [4.0, 2.0], budget)


@pytest.mark.parametrize("budget, message", [(True, "budget is bool"), ("1e4", "budget is str"),
                                             ([1e4], "budget must be one number")])
def test_loss_at_compute_refuses_a_budget_that_is_not_one_number(budget, message):
    with pytest.raises(TypeError, match=f"loss_at_compute: {message}"):
        loss_at_compute([1e3, 1e5], [4.0, 2.0], budget)


@pytest.mark.parametrize("loss", [[float("nan"), 2.0], [4.0, float("inf")]])
def test_loss_at_compute_refuses_diverged_losses(loss):
    with pytest.raises(ValueError, match="loss_at_compute: every loss must be a finite number"):
        loss_at_compute([1e3, 1e5], loss, 1e4)


def test_loss_at_compute_averages_points_at_the_same_compute():
    # duplicates used to be interpolated in whatever order argsort left them (here 2.0, 1.5 and 3.0)
    compute, loss = [1e3, 1e3, 1e5, 1e5], [4.0, 2.0, 1.0, 3.0]  # means: 3.0 at 1e3, 2.0 at 1e5
    assert [loss_at_compute(compute, loss, budget) for budget in (1e3, 1e4, 1e5)] == pytest.approx([3.0, 2.5, 2.0])
    assert loss_at_compute(compute[::-1], loss[::-1], 1e4) == pytest.approx(2.5)


def test_loss_at_compute_keeps_its_answers_for_good_input():
    assert loss_at_compute(np.array([1e5, 1e3, 1e4]), (2.0, 4.0, 3.5), np.float32(1e4)) == pytest.approx(3.5)
    assert loss_at_compute([1e3], [4.0], 1e3) == 4.0


def test_isoflop_optimum_breaks_ties_towards_the_smallest_size_in_any_order():
    # the first of the tied sizes in the order given used to win (3e6 here)
    assert isoflop_optimum([3e6, 1e6, 2e6], [2.0, 2.0, 2.0]) == 1e6
    assert isoflop_optimum([3e6, 1e6, 2e6, 5e6], [1.0, 1.0, 2.0, 2.0]) == 1e6
    assert isoflop_optimum([1e6, 3e6, 2e6, 5e6], [1.0, 1.0, 2.0, 2.0]) == 1e6


def test_isoflop_optimum_counts_sizes_that_coincide_in_log_as_one():
    import warnings
    sizes = [1e300, np.nextafter(1e300, 2e300), np.nextafter(np.nextafter(1e300, 2e300), 2e300)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the parabola through equal logs used to warn "poorly conditioned"
        assert isoflop_optimum(sizes, [2.0, 1.0, 2.0]) == sizes[1]


@pytest.mark.parametrize("sizes", [[True, 2e6, 3e6], ["1e6", "2e6", "3e6"]])
def test_isoflop_optimum_refuses_what_only_looks_like_numbers(sizes):
    with pytest.raises(TypeError, match="isoflop_optimum: n_params holds .* not a real number"):
        isoflop_optimum(sizes, [3.0, 2.5, 2.8])
