"""minillm.scaling against independent references: numpy least squares in log space, the known law the data
was drawn from, brute-force searches, and scipy.optimize.least_squares where scipy is installed.

The offset fit promises the least-squares fit in log(y) over a, b and 0 <= c < min(y). Two references that need
no optimiser: the law the noisy data was drawn from is a feasible point, so the fit's error may not exceed its
error; and at a (local) minimum no small move of a, b or c lowers the error.
"""
import math
import sys
import warnings

import numpy as np
import pytest

from minillm.scaling import PowerLaw, fit_power_law, isoflop_optimum, loss_at_compute


def log_error(law: PowerLaw, x, y) -> float:
    """The objective fit_power_law documents: sum of squared errors in log(y), computed here without the module."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    log_power = math.log(law.scale) - law.exponent * np.log(x)
    log_model = np.logaddexp(math.log(law.offset) if law.offset > 0 else -math.inf, log_power)
    return float(np.sum((log_model - np.log(y)) ** 2))


def draw(law: PowerLaw, x, noise, seed):
    """Points of the law at x with multiplicative Gaussian noise of relative size `noise` (computed with numpy)."""
    rng = np.random.default_rng(seed)
    return (law.offset + law.scale * x ** -law.exponent) * (1 + noise * rng.standard_normal(x.size))


def law_through(exponent, offset, x):
    """A law whose power-law term equals max(offset, 1) at the geometric middle of x, so it is visible in the data."""
    middle = math.exp(float(np.log(x).mean()))
    return PowerLaw(max(offset, 1.0) * middle ** exponent, exponent, offset)


def assert_local_minimum(law: PowerLaw, x, y):
    """No move of log a, b or c (alone or together, from 1e-2 down to 1e-6) lowers the error in log(y)."""
    base = log_error(law, x, y)
    ceiling = float(np.min(y))
    rng = np.random.default_rng(0)
    directions = list(np.eye(3)) + list(rng.standard_normal((6, 3)))
    for step in (1e-2, 1e-4, 1e-6):
        for direction in directions:
            for sign in (1, -1):
                d = sign * step * direction
                offset = law.offset + d[2] * ceiling
                if not 0 <= offset < ceiling:
                    continue  # outside the documented range of c
                moved = PowerLaw(law.scale * math.exp(d[0]), law.exponent + d[1], offset)
                assert log_error(moved, x, y) >= base * (1 - 1e-9) - 1e-300, (step, d)


# ---- offset=False: a straight line in log-log space, the same as numpy's least squares ----

@pytest.mark.parametrize("exponent", [0.05, 0.3, 1.0, 1.5, -0.5, -1.5])
def test_fit_without_offset_is_numpy_least_squares_in_log_space(exponent):
    x = np.logspace(3, 21, 15)  # FLOPs from 1e3 to 1e21
    y = draw(law_through(exponent, 0.0, x), x, noise=0.01, seed=1)
    law = fit_power_law(x, y, offset=False)
    design = np.column_stack([np.ones(x.size), np.log(x)])
    (log_a, slope), *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    assert law.exponent == pytest.approx(-slope, rel=1e-9, abs=1e-12)
    assert math.log(law.scale) == pytest.approx(log_a, rel=1e-9, abs=1e-9)
    assert law.offset == 0.0
    assert law.exponent == pytest.approx(exponent, abs=0.002)  # 1% noise over 18 decades pins b down


# ---- offset=True: exact data is recovered, noisy data gets the least-squares fit in log(y) ----

@pytest.mark.parametrize("exponent", [0.05, 0.3, 1.0, 1.5, -0.3, -1.0])
@pytest.mark.parametrize("offset", [0.0, 0.5, 3.0])
def test_fit_recovers_exact_laws(exponent, offset):
    x = np.logspace(3, 21, 12) if abs(exponent) < 0.5 else np.logspace(6, 14, 12)
    true = law_through(exponent, offset, x)
    law = fit_power_law(x, true(x))
    assert law.exponent == pytest.approx(exponent, rel=1e-5)
    assert law.offset == pytest.approx(offset, rel=1e-5, abs=1e-6 * max(offset, 1))
    assert law.scale == pytest.approx(true.scale, rel=1e-4)


@pytest.mark.parametrize("exponent, tolerance", [(0.05, 0.1), (0.1, 0.05), (0.3, 0.01), (0.5, 0.01), (1.0, 0.005),
                                                 (1.5, 0.005), (-0.3, 0.01), (-1.0, 0.005)])
@pytest.mark.parametrize("offset", [0.0, 2.0])
def test_noisy_fit_is_the_least_squares_fit_in_log_y(exponent, tolerance, offset):
    # b >= 1 with an offset: the line through log(y - c) for the scanned c used to stop at an error in log(y)
    # 10-30000x that of the true law (exponent 1.5 came out as 1.38); Levenberg-Marquardt steps now finish the fit
    x = np.logspace(4, 12, 15) if abs(exponent) >= 0.5 else np.logspace(3, 21, 15)
    true = law_through(exponent, offset, x)
    y = draw(true, x, noise=0.003, seed=int(100 * abs(exponent)) + int(offset))
    law = fit_power_law(x, y)
    if offset < y.min():  # the true law is feasible (c < min(y) is documented), so never beaten
        assert log_error(law, x, y) <= log_error(true, x, y) * (1 + 1e-9)
    assert_local_minimum(law, x, y)
    assert law.exponent == pytest.approx(exponent, rel=tolerance)


def test_steep_law_with_offset_matches_the_true_law_closely():
    # the case the scan alone got wrong: 1.5 came out as 1.38 with an error in log(y) 300x the true law's
    x = np.logspace(5, 13, 15)
    true = law_through(1.5, 0.5, x)
    y = draw(true, x, noise=0.01, seed=160)
    law = fit_power_law(x, y)
    assert law.exponent == pytest.approx(1.5, rel=0.01)
    assert log_error(law, x, y) <= log_error(true, x, y)


def test_fit_agrees_with_scipy_least_squares():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(7)
    for exponent in (0.1, 0.5, 1.5, -0.5):
        for offset in (0.0, 1.0):
            x = np.logspace(4, 12, 12)
            true = law_through(exponent, offset, x)
            y = draw(true, x, noise=0.005, seed=int(rng.integers(1000)))
            law = fit_power_law(x, y)
            log_x, log_y, ceiling = np.log(x), np.log(y), float(y.min())

            def residuals(p):
                return np.logaddexp(math.log(p[2] * ceiling) if p[2] > 0 else -math.inf, p[0] - p[1] * log_x) - log_y

            best = min((optimize.least_squares(residuals, start, bounds=([-np.inf, -np.inf, 0], [np.inf, np.inf, 1]),
                                               xtol=1e-15, ftol=1e-15, gtol=1e-15) for start in
                        ([math.log(true.scale), exponent, offset / ceiling * 0.99],
                         [math.log(law.scale), law.exponent, min(law.offset / ceiling, 0.999)])),
                       key=lambda result: result.cost)
            assert log_error(law, x, y) <= 2 * best.cost * (1 + 1e-7) + 1e-30


# ---- awkward but valid input ----

def test_order_duplicates_and_containers_do_not_change_the_fit():
    x = np.logspace(4, 12, 9)
    y = draw(law_through(0.4, 1.0, x), x, noise=0.003, seed=3)
    reference = fit_power_law(x, y)
    order = np.random.default_rng(1).permutation(x.size)
    shuffled = fit_power_law(x[order], y[order])
    for field in ("scale", "exponent", "offset"):
        assert getattr(shuffled, field) == pytest.approx(getattr(reference, field), rel=1e-6)
    # every point twice weighs every point twice: the same least-squares problem
    doubled = fit_power_law(np.concatenate([x, x[::-1]]), np.concatenate([y, y[::-1]]))
    assert doubled.exponent == pytest.approx(reference.exponent, rel=1e-6)
    torch = pytest.importorskip("torch")
    for as_input in (list, tuple, torch.tensor):
        again = fit_power_law(as_input(list(x)), as_input(list(y)))
        assert again.exponent == pytest.approx(reference.exponent, rel=1e-9)


def test_ints_and_float32_are_fitted_as_their_float64_values():
    x_int = [10 ** k for k in range(3, 22, 2)]  # Python ints up to 1e21: exact, beyond int64's range
    y = draw(PowerLaw(50.0, 0.1, 1.5), np.array(x_int, float), noise=0.0, seed=0)
    assert fit_power_law(x_int, y).exponent == pytest.approx(0.1, rel=1e-5)
    x32, y32 = np.array(x_int, np.float32), y.astype(np.float32)
    from_32 = fit_power_law(x32, y32)
    from_64 = fit_power_law(x32.astype(float), y32.astype(float))
    assert from_32 == from_64
    assert from_32.exponent == pytest.approx(0.1, rel=1e-3)  # float32 rounding of y (~1e-7) is the only error


@pytest.mark.parametrize("x_unit, y_unit", [(1e-30, 1.0), (1e30, 1.0), (1.0, 1e-30), (1.0, 1e30), (1e30, 1e-30)])
def test_units_rescale_the_law_without_overflow(x_unit, y_unit):
    # fit(kx, my) is fit(x, y) with a -> m a k^b and c -> m c; no float over- or underflow on the way
    x = np.logspace(0, 8, 10)
    y = draw(PowerLaw(20.0, 0.5, 1.0), x, noise=0.003, seed=5)
    plain = fit_power_law(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = fit_power_law(x * x_unit, y * y_unit)
        assert np.all(np.isfinite(scaled(x * x_unit)))
    assert scaled.exponent == pytest.approx(plain.exponent, rel=1e-6)
    assert scaled.offset == pytest.approx(plain.offset * y_unit, rel=1e-6)
    assert math.log(scaled.scale) == pytest.approx(math.log(plain.scale * y_unit) + plain.exponent * math.log(x_unit),
                                                   rel=1e-8, abs=1e-6)


def test_three_points_are_fitted_exactly():
    # the documented minimum for offset=True: three points of a law determine it
    x = np.array([1e6, 1e9, 1e12])
    true = PowerLaw(300.0, 0.25, 1.7)
    law = fit_power_law(x, true(x))
    assert law(x) == pytest.approx(true(x), rel=1e-8)
    assert law.exponent == pytest.approx(0.25, rel=1e-5) and law.offset == pytest.approx(1.7, rel=1e-5)
    two = fit_power_law([1e6, 1e12], [3.0, 2.0], offset=False)  # and two for offset=False
    assert two([1e6, 1e12]) == pytest.approx([3.0, 2.0], rel=1e-12)


def test_pure_power_law_keeps_its_offset_at_the_lower_bound():
    # chapter 03 prints a note when c comes out exactly 0; the final refinement must not leave a 1e-13 residue
    x = np.logspace(3, 9, 8)
    zeros = 0
    for seed in range(20):
        y = draw(PowerLaw(50.0, 0.2), x, noise=0.01, seed=seed)
        law = fit_power_law(x, y)
        zeros += law.offset == 0.0
        assert 0.0 <= law.offset < y.min()
        assert law.offset == 0.0 or law.offset > 1e-9 * y.min()
    assert zeros >= 5


@pytest.mark.parametrize("log_x, log_y", [([-98.49859441, 429.16102526, 370.97128427],
                                            [-646.70912274, 368.7284703, -429.41398247]),
                                           ([11.95380782, 47.01433278, 37.18275331, 15.64183888],
                                            [523.97123026, -489.11190065, -688.1555023, -65.69996969])])
def test_refinement_keeps_the_scale_a_normal_float(log_x, log_y):
    # wild points the scan alone fitted: unguarded refinement walked a to e^-5518 / e^2435 and the fit raised
    law = fit_power_law(np.exp(log_x), np.exp(log_y))
    assert sys.float_info.min <= law.scale < math.inf and 0 <= law.offset < np.exp(log_y).min()


# ---- the law and its inverse ----

@pytest.mark.parametrize("exponent", [0.05, 0.3, 1.5, -0.05, -1.5])
@pytest.mark.parametrize("offset", [0.0, 1.5])
def test_law_matches_numpy_and_inverts(exponent, offset):
    law = PowerLaw(7.0, exponent, offset)
    x = np.logspace(3, 21, 7)
    assert law(x) == pytest.approx(offset + 7.0 * x ** -exponent, rel=1e-14)
    for point in x:
        y = law(float(point))
        if y == offset:  # the power term is below the offset's last digit: documented, no finite x gets there
            assert exponent > 0 and law.inverse(y) == math.inf
            continue
        # y - c loses digits when the power term is small next to c: allow for that, and for 1/|b|
        conditioning = abs(y) / abs(y - offset) / abs(exponent)
        assert law.inverse(y) == pytest.approx(point, rel=1e-13 * conditioning + 1e-13)


def test_law_reads_tensors_float32_and_extreme_magnitudes():
    torch = pytest.importorskip("torch")
    law = PowerLaw(2.0, 1.5, 1.0)
    values = [1e-30, 1.0, 1e30]
    expected = 1.0 + 2.0 * np.array(values) ** -1.5
    assert law(torch.tensor(values, dtype=torch.float64)) == pytest.approx(expected, rel=1e-14)
    assert law(np.array(values, np.float32)) == pytest.approx(expected, rel=1e-6)
    assert law.inverse(law(1e-30)) == pytest.approx(1e-30, rel=1e-12)
    assert law.inverse(law(1e30)) == math.inf  # 1 + 2e-45 is 1.0, the offset: documented as inf
    pure = PowerLaw(2.0, 1.5)
    assert pure.inverse(pure(1e30)) == pytest.approx(1e30, rel=1e-12)
    assert pure.inverse(1e-300) == pytest.approx((2.0 / 1e-300) ** (1 / 1.5), rel=1e-12)  # 2e300^(2/3), in logs


# ---- IsoFLOP optimum: the vertex of the least-squares parabola, against a brute-force search ----

def brute_force_vertex(sizes, losses):
    """The minimum over a dense grid of the least-squares parabola in log size (numpy lstsq, centred and scaled)."""
    log_n = np.log(np.asarray(sizes, float))
    centre, spread = log_n.mean(), log_n.std()
    t = (log_n - centre) / spread
    coefficients, *_ = np.linalg.lstsq(np.column_stack([np.ones_like(t), t, t * t]), np.asarray(losses, float),
                                       rcond=None)
    grid = np.linspace(t.min(), t.max(), 200001)
    fitted = coefficients[0] + coefficients[1] * grid + coefficients[2] * grid ** 2
    best = int(np.argmin(fitted))
    if best in (0, grid.size - 1):  # no minimum inside the sizes tried: documented, the best size tried
        losses = np.asarray(losses, float)
        return float(np.asarray(sizes, float)[losses == losses.min()].min()), 0.0
    return float(np.exp(centre + spread * grid[best])), spread * (grid[1] - grid[0])


def chinchilla_loss(n, compute, e=1.69, a=406.4, b=410.7, alpha=0.34, beta=0.28):
    """Hoffmann et al.'s fitted L(N, D) with D = C / (6N) tokens."""
    return e + a / n ** alpha + b / (compute / (6 * n)) ** beta


@pytest.mark.parametrize("compute", [1e18, 1e21, 1e24])
def test_isoflop_optimum_is_the_parabola_vertex_and_near_the_true_optimum(compute):
    alpha, beta, a, b = 0.34, 0.28, 406.4, 410.7
    # dL/dN = 0: N* = G (C/6)^(beta/(alpha+beta)), G = (alpha a / (beta b))^(1/(alpha+beta))
    true_n = (alpha * a / (beta * b)) ** (1 / (alpha + beta)) * (compute / 6) ** (beta / (alpha + beta))
    sizes = true_n * np.exp(np.linspace(-1.5, 1.2, 9))  # a deliberately lopsided sweep, in shuffled order
    sizes = sizes[np.random.default_rng(2).permutation(sizes.size)]
    losses = chinchilla_loss(sizes, compute)
    got = isoflop_optimum(sizes, losses)
    reference, resolution = brute_force_vertex(sizes, losses)
    assert math.log(got) == pytest.approx(math.log(reference), abs=resolution)
    assert got == pytest.approx(true_n, rel=0.1)  # the parabola's own error, not the module's


def test_isoflop_optimum_with_noise_repeats_and_tensors_matches_brute_force():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    sizes = np.repeat(np.logspace(6, 9, 7), 2)  # two seeds per size
    losses = chinchilla_loss(sizes, 1e19) * (1 + 0.002 * rng.standard_normal(sizes.size))
    reference, resolution = brute_force_vertex(sizes, losses)
    for container in (list, np.asarray, torch.tensor):
        got = isoflop_optimum(container(list(sizes)), container(list(losses)))
        assert math.log(got) == pytest.approx(math.log(reference), abs=resolution)


def test_isoflop_optimum_keeps_its_precision_for_close_sizes_at_large_magnitude():
    # polyfit on uncentred log sizes (46 at 1e20) lost the vertex of sizes a part per million apart: it warned
    # "poorly conditioned" and returned the nearest size tried instead of the vertex
    sizes = 1e20 * np.exp(1e-6 * np.arange(5))
    losses = 2.0 + ((np.log(sizes) - np.log(sizes[0]) - 1.3e-6) / 1e-6) ** 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = isoflop_optimum(sizes, losses)
    assert (math.log(got) - math.log(sizes[0])) / 1e-6 == pytest.approx(1.3, abs=1e-3)


@pytest.mark.parametrize("losses", [[3.0, 2.0, 1.5, 1.2, 1.0], [1.0, 1.2, 1.5, 2.0, 3.0], [2.0, 2.5, 2.6, 2.5, 2.0],
                                    [5.0, 4.0, 3.0, 2.0, 1.0], [3.0, 1.0, 1.1, 2.0, 4.0], [3.0, 3.0, 1.0, 3.0, 3.0]])
def test_isoflop_optimum_agrees_with_brute_force_inside_and_outside_the_sizes(losses):
    # documented: the vertex when it lies among the sizes tried, else (or when concave) the best size tried
    sizes = np.logspace(5, 9, 5)
    reference, resolution = brute_force_vertex(sizes, losses)
    assert math.log(isoflop_optimum(sizes, losses)) == pytest.approx(math.log(reference), abs=resolution + 1e-12)


# ---- loss_at_compute: piecewise-linear interpolation in log(compute), against a loop ----

def test_loss_at_compute_matches_a_segment_by_segment_reference():
    rng = np.random.default_rng(9)
    compute = np.concatenate([np.logspace(3, 21, 12), [1e9, 1e15]])  # two computes measured twice
    loss = rng.uniform(1.0, 5.0, compute.size)
    order = rng.permutation(compute.size)
    means = {c: loss[compute == c].mean() for c in np.unique(compute)}
    points = sorted(means.items())
    for budget in np.concatenate([np.logspace(3, 21, 37), [1e9, 1e15, 1e21]]):
        for (c0, l0), (c1, l1) in zip(points, points[1:]):
            if c0 <= budget <= c1:
                weight = (math.log(budget) - math.log(c0)) / (math.log(c1) - math.log(c0))
                expected = l0 + weight * (l1 - l0)
                break
        assert loss_at_compute(compute[order], loss[order], budget) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(loss_at_compute(compute, loss, 1e22)) and math.isnan(loss_at_compute(compute, loss, 1e2))
