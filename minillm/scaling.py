"""Scaling laws in small: fit loss = a * C^-b (+ c) to (compute, loss) points, and find compute-optimal sizes.

Taught in chapter 03 (pretraining). Kaplan et al. (arXiv:2001.08361) and Chinchilla (Hoffmann et al.,
arXiv:2203.15556) fit such power laws to hundreds of training runs; chapter 03 fits them to a dozen runs
on the reader's machine.

    law = fit_power_law(compute, loss)               # PowerLaw(scale=a, exponent=b, offset=c)
    law(1e15)                                        # predicted loss at 1e15 FLOPs
    n_opt = isoflop_optimum(n_params, losses)        # best size for one compute budget (IsoFLOP parabola)

Everything here is numpy on a handful of points: no optimiser library is needed. With an offset, the fit
scans the offset c below the smallest loss and, for each c, fits log(loss - c) = log a - b log C by least
squares; the c with the smallest error in log(loss) wins and is refined by golden-section search. A few
Levenberg-Marquardt steps then move a, b and c together to the least-squares fit in log(loss).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["PowerLaw", "fit_power_law", "isoflop_optimum", "loss_at_compute"]


@dataclass(frozen=True)
class PowerLaw:
    """y = offset + scale * x ** (-exponent), for x > 0. A negative exponent describes a quantity that grows with x.

    The three numbers must be finite reals; they are stored as floats.
    """

    scale: float
    exponent: float
    offset: float = 0.0

    def __post_init__(self):
        for field in fields(self):
            value = _scalar(getattr(self, field.name), field.name, "PowerLaw")
            if not math.isfinite(value):
                raise ValueError(f"PowerLaw: {field.name}={value!r} must be a finite number; build the law from "
                                 "finite numbers (fit_power_law returns such a law)")
            object.__setattr__(self, field.name, value)  # frozen dataclass: set the float version once, here

    def __call__(self, x):
        x = _numbers(x, "x", "PowerLaw")
        if np.any(np.isnan(x) | (x <= 0)):
            bad = x[np.isnan(x) | (x <= 0)].ravel()[0]
            raise ValueError(f"PowerLaw: x={float(bad)!r} is not > 0; a power law of compute or size is defined only "
                             "for x > 0, so evaluate it at positive x")
        if self.scale == 0:  # 0 * inf (x ** -exponent overflowing) would give NaN instead of the offset
            values = np.full(x.shape, self.offset)
        else:
            with np.errstate(over="ignore"):  # a term beyond the float range is inf, as for any float overflow
                values = self.offset + self.scale * x ** (-self.exponent)
        return float(values) if np.ndim(values) == 0 else values

    def inverse(self, y: float) -> float:
        """The x > 0 at which the law reaches y.

        With exponent > 0 the law approaches its offset as x grows but never reaches it: a y at the offset or
        beyond it (below the irreducible loss, for a falling law) returns inf, as no finite x gets there. With
        exponent < 0 the law starts at its offset at x = 0: y equal to the offset returns 0.0, and a y beyond it
        is a ValueError, as no x gets there. inf also when the x is too large for a float.
        """
        y = _scalar(y, "y", "PowerLaw.inverse")
        if self.scale == 0 or self.exponent == 0:
            raise ValueError(f"PowerLaw.inverse: {self} is constant in x (scale or exponent is 0), so no single "
                             "x reaches a given y; fit the law to points that vary with x")
        if not math.isfinite(y):
            raise ValueError(f"PowerLaw.inverse: y={y!r} must be a finite number; ask for a finite target value")
        gap = y - self.offset  # must equal scale * x ** -exponent, which has the sign of scale for every x > 0
        if gap == 0 or (gap > 0) != (self.scale > 0):
            if self.exponent > 0:
                return math.inf
            if gap == 0:
                return 0.0
            side = "above" if self.scale > 0 else "below"
            raise ValueError(f"PowerLaw.inverse: {self} stays {side} its offset {self.offset:.6g} for every x > 0, "
                             f"so no x reaches y={y:.6g}; ask for a y {side} {self.offset:.6g}")
        log_x = (math.log(abs(gap)) - math.log(abs(self.scale))) / -self.exponent  # logs: no overflow on the way
        try:
            return math.exp(log_x)
        except OverflowError:
            return math.inf

    def __str__(self) -> str:
        # "+ 0.0" turns -0.0 into 0.0, so an exponent of 0 prints as x^(0), not x^(-0)
        power = -self.exponent + 0.0
        offset = f" {'-' if self.offset < 0 else '+'} {abs(self.offset):.3g}" if self.offset else ""
        return f"{self.scale:.3g} * x^({power:.3g}){offset}"


def _numbers(values, name: str, caller: str) -> np.ndarray:
    """`values` (a number, list, tuple, numpy array or torch tensor) as a float array of the same shape.

    Refuses what np.asarray(values, dtype=float) would quietly turn into numbers: strings ("3" -> 3.0),
    bools (True -> 1.0), None (-> nan) and complex numbers (imaginary part dropped).
    """
    try:
        if isinstance(values, (list, tuple)):
            # dtype=object keeps each item's own type (True stays a bool); tensors in the list become arrays first
            array = np.asarray([_detached(item) for item in values], dtype=object)
        else:
            array = np.asarray(_detached(values))
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{caller}: {name} could not be read as numbers ({error}); pass a list, tuple or "
                        "array of ints or floats") from None
    if array.dtype.kind in "iuf":
        return array.astype(float)
    array = array.astype(object)  # strings, bools, complex, dates...: refused item by item below, naming the first
    converted = np.empty(array.shape, dtype=float)
    for position, item in zip(np.ndindex(array.shape), array.flat):
        item = _detached(item)
        if isinstance(item, np.ndarray) and item.ndim == 0:
            item = item.item()
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, numbers.Real):
            where = "is" if array.ndim == 0 else "holds"
            raise TypeError(f"{caller}: {name} {where} {type(item).__name__} {item!r:.40}, not a real number; pass "
                            "ints or floats in a list, tuple or array (convert strings with float(); bools and complex "
                            "numbers are refused)")
        try:
            converted[position] = float(item)
        except OverflowError:
            raise ValueError(f"{caller}: {name} has {item!r:.40}, too large for a float; rescale it (e.g. "
                             "PFLOPs instead of FLOPs)") from None
    return converted


def _detached(value):
    """A torch tensor as a numpy array (even on a GPU, needing grad or in bfloat16); anything else unchanged."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        return (value.double() if value.is_floating_point() else value).numpy()  # numpy has no bfloat16
    return value


def _flat(values, name: str, caller: str) -> np.ndarray:
    """`values` as a 1-D float array; a column or row of a 2-D array is fine, a table is not."""
    array = _numbers(values, name, caller)
    if np.squeeze(array).ndim > 1:
        raise ValueError(f"{caller}: {name} has shape {array.shape}; pass a flat list or 1-D array of points")
    return array.ravel()


def _scalar(value, name: str, caller: str) -> float:
    """`value` as one float: a Python or numpy number or a 0-d array or tensor, never a bool or string."""
    if isinstance(value, (list, tuple)):
        raise TypeError(f"{caller}: {name} must be one number, got a {type(value).__name__} of {len(value)}; "
                        "pass a single int or float")
    array = _numbers(value, name, caller)
    if array.ndim != 0:
        raise TypeError(f"{caller}: {name} must be one number, got an array of shape {array.shape}; "
                        "pass a single int or float")
    return float(array)


def _as_points(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = _flat(x, "x", "fit_power_law"), _flat(y, "y", "fit_power_law")
    if x.shape != y.shape:
        raise ValueError(f"fit_power_law: got {x.size} x values and {y.size} y values; pass one y per x")
    if x.size == 0:
        raise ValueError("fit_power_law: got no points; pass lists of x and y values, at least 3 distinct x "
                         "(2 with offset=False)")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("fit_power_law: every x and y must be a finite number; drop NaN/inf points first")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("fit_power_law: x (compute) and y (loss) must be > 0 for a power law; drop points at "
                         "or below 0 first")
    return x, y


def _log_linear(log_x: np.ndarray, log_y: np.ndarray) -> tuple[float, float]:
    """Least-squares line log_y = intercept + slope * log_x (fitted about the mean of log_x, for accuracy)."""
    centre = float(log_x.mean())
    slope, intercept = np.polyfit(log_x - centre, log_y, 1)
    return float(intercept - slope * centre), float(slope)


def _law(intercept: float, slope: float, offset: float) -> PowerLaw:
    """PowerLaw(scale=e^intercept, exponent=-slope, offset), refusing a scale that a float cannot hold."""
    scale = math.exp(intercept) if intercept < 709 else math.inf
    if scale == 0 or scale == math.inf:
        raise ValueError(f"fit_power_law: the fitted scale a = e^{intercept:.4g} is outside the float range, so "
                         "the law cannot be stored; measure x or y in other units (e.g. PFLOPs instead of FLOPs)")
    return PowerLaw(scale=scale, exponent=-slope + 0.0, offset=offset)


def fit_power_law(x, y, offset: bool = True) -> PowerLaw:
    """Fit y = a * x^-b (+ c) to points (x, y); returns PowerLaw(scale=a, exponent=b, offset=c).

    offset=False fits a straight line in log-log space (needs 2+ distinct x). offset=True also fits the
    irreducible loss c, 0 <= c < min(y) (needs 3+ distinct x); the error minimised is in log(y). Flat data
    (all y equal) gives the exact fit y = y0 * x^0, with c = 0 (any c would fit it equally well).
    The work is done in logs, so tiny (subnormal) and huge values fit as well as ordinary ones.
    """
    if not isinstance(offset, (bool, np.bool_)):
        raise TypeError(f"fit_power_law: offset={offset!r} must be True or False (whether to fit the irreducible "
                        "loss c); to use a known c, fit y - c with offset=False")
    x, y = _as_points(x, y)
    log_x, log_y = np.log(x), np.log(y)
    distinct = np.unique(log_x).size
    needed = 3 if offset else 2
    if distinct < needed:
        merged = (" (x values closer together than float precision in log(x) count as one)"
                  if np.unique(x).size > distinct else "")
        raise ValueError(f"fit_power_law: {distinct} distinct x value(s){merged} cannot determine "
                         f"{'a, b and c' if offset else 'a and b'}; give at least {needed}"
                         + (" or use offset=False" if offset else ""))
    if np.all(y == y[0]):
        return PowerLaw(scale=float(y[0]), exponent=0.0, offset=0.0)
    if not offset:
        return _law(*_log_linear(log_x, log_y), 0.0)

    # Offsets c = min(y) * (1 - gap), 0 < gap <= 1, kept in logs: log(y - c) = log(y) + log(1 - r + r * gap) with
    # r = min(y) / y, and log(c + a x^-b) by logaddexp, so no intermediate under- or overflows.
    ceiling, log_ceiling = float(y.min()), float(log_y.min())
    ratio = np.exp(log_ceiling - log_y)
    above = -np.expm1(log_ceiling - log_y)  # 1 - ratio, exact for the smallest y

    def error(gap: float) -> float:
        intercept, slope = _log_linear(log_x, log_y + np.log(above + ratio * gap))
        log_c = log_ceiling + math.log1p(-gap) if gap < 1 else -math.inf
        return float(np.sum((np.logaddexp(log_c, intercept + slope * log_x) - log_y) ** 2))

    # Offsets crowd towards min(y), where the fit is most sensitive, so scan the gap on a log grid.
    gaps = np.concatenate([[1.0], np.logspace(-6, 0, 400, endpoint=False)[::-1]])
    errors = [error(gap) for gap in gaps]
    best = int(np.argmin(errors))
    low = gaps[max(best - 1, 0)]
    high = gaps[min(best + 1, len(gaps) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):  # golden-section search inside the bracket around the best grid point
        left, right = high - golden * (high - low), low + golden * (high - low)
        if error(left) < error(right):
            high = right
        else:
            low = left
    refined = float((low + high) / 2)
    gap = refined if error(refined) <= errors[best] else float(gaps[best])
    intercept, slope = _log_linear(log_x, log_y + np.log(above + ratio * gap))
    polished = _polish(log_x, log_y, intercept, slope, gap, error(gap))
    if polished is None:
        return _law(intercept, slope, ceiling * (1.0 - gap))
    intercept, slope, fraction = polished
    return _law(intercept, slope, ceiling * fraction)


def _polish(log_x, log_y, intercept: float, slope: float, gap: float, cost: float):
    """(intercept, slope, c / min(y)) minimising sum (log(c + e^intercept x^slope) - log y)^2, from the scan's answer.

    The scan fits each c's line to log(y - c), which weighs the points nearest c far above the rest, so with noisy
    data its a and b are not the least-squares ones in log(y) (b >= 1 came out up to 20% off at 0.3% noise).
    Levenberg-Marquardt steps on (log a at the mean log x, slope, u), with c = min(y) * sigmoid(u) so that
    0 <= c < min(y), fix that. None when they do not lower the error `cost` of the scan's answer.
    """
    centre = float(log_x.mean())
    dx, log_ceiling = log_x - centre, float(log_y.min())

    def residuals(p):  # log(c + a x^-b) - log y, and log(a x^-b) - log c
        log_c = log_ceiling - np.logaddexp(0.0, -p[2])
        t = p[0] + p[1] * dx
        return np.logaddexp(log_c, t) - log_y, t - log_c

    u = math.log1p(-gap) - math.log(gap) if gap < 1 else -30.0  # c = min(y) * (1 - gap) = min(y) * sigmoid(u)
    p = np.array([intercept + slope * centre, slope, min(max(u, -30.0), 30.0)])  # sigmoid(30) < 1: c < min(y)
    r, z = residuals(p)
    best, damping = float(r @ r), 1e-3
    for _ in range(200):
        w = np.exp(-np.logaddexp(0.0, -z))  # share of the power-law term in c + a x^-b
        jacobian = np.column_stack([w, w * dx, (1 - w) * math.exp(-np.logaddexp(0.0, p[2]))])
        hessian, gradient = jacobian.T @ jacobian, jacobian.T @ r
        try:
            step = np.linalg.solve(hessian + damping * np.diag(np.diag(hessian) + 1e-12), -gradient)
        except np.linalg.LinAlgError:
            break
        trial = p + step
        trial[2] = min(max(trial[2], -30.0), 30.0)
        r_trial, z_trial = residuals(trial)
        value = float(r_trial @ r_trial)
        # a = e^intercept must stay a normal float: beyond, _law refuses it or a subnormal a loses its digits
        if value < best and -708 < trial[0] - trial[1] * centre < 709:
            converged = best - value <= 1e-15 * best
            p, r, z, best, damping = trial, r_trial, z_trial, value, damping / 3
            if converged:
                break
        else:
            damping *= 4
            if damping > 1e12:
                break
    if not best < cost:
        return None
    if p[2] <= -30.0:  # c at its lower bound: the least-squares fit there is the line through log y, with c = 0
        return (*_log_linear(log_x, log_y), 0.0)
    return float(p[0] - p[1] * centre), float(p[1]), math.exp(-np.logaddexp(0.0, -p[2]))


def isoflop_optimum(n_params, losses) -> float:
    """The model size with the lowest loss at one compute budget (Chinchilla's IsoFLOP "approach 2").

    Fits a parabola to loss against log(n_params) and returns its minimum; when the parabola has no
    minimum inside the sizes tried (it opens downward, or the minimum lies outside), returns the best
    size tried, since extrapolating a parabola says nothing trustworthy. Among sizes tied for the lowest
    loss (or when all losses are equal) the best size tried is the smallest, whatever the order given.
    """
    sizes, values = _flat(n_params, "n_params", "isoflop_optimum"), _flat(losses, "losses", "isoflop_optimum")
    if sizes.shape != values.shape or sizes.size == 0:
        raise ValueError(f"isoflop_optimum: got {sizes.size} sizes and {values.size} losses; pass one loss per size")
    if not (np.all(np.isfinite(sizes)) and np.all(np.isfinite(values))):
        raise ValueError("isoflop_optimum: every size and loss must be a finite number; drop NaN/inf points first")
    if np.any(sizes <= 0):
        raise ValueError("isoflop_optimum: sizes (parameter counts) must be > 0; drop points at or below 0 first")
    best_tried = float(sizes[values == values.min()].min())
    log_sizes = np.log(sizes)
    if np.unique(log_sizes).size < 3 or np.all(values == values[0]):
        return best_tried
    # about the mean log size: uncentred, log N ~ 46 at 1e20 swamps a spread of 0.01 and polyfit loses the vertex
    centre = float(log_sizes.mean())
    curvature, slope, _ = np.polyfit(log_sizes - centre, values, 2)
    if curvature <= 0:
        return best_tried
    vertex = centre - slope / (2 * curvature)
    if not log_sizes.min() <= vertex <= log_sizes.max():
        return best_tried
    return float(math.exp(vertex))


def loss_at_compute(compute, loss, budget: float) -> float:
    """One training curve's loss at `budget` FLOPs, interpolated linearly in log(compute); NaN outside it.

    Points measured at the same compute (e.g. a periodic and a final evaluation at one step) count as one
    point at their mean loss.
    """
    compute, loss = _flat(compute, "compute", "loss_at_compute"), _flat(loss, "loss", "loss_at_compute")
    budget = _scalar(budget, "budget", "loss_at_compute")
    if compute.shape != loss.shape or compute.size == 0:
        raise ValueError(f"loss_at_compute: got {compute.size} compute values and {loss.size} losses; pass one "
                         "loss per compute value, at least one point")
    if np.any(np.isnan(compute)):
        raise ValueError("loss_at_compute: a compute value is NaN; drop that point first")
    if not np.all((compute > 0) & (compute < math.inf)):
        # The interpolation is in log(compute): 0, negative or infinite compute has no place on that axis.
        raise ValueError("loss_at_compute: every compute value must be a finite number > 0 (FLOPs)")
    if not np.all(np.isfinite(loss)):
        raise ValueError("loss_at_compute: every loss must be a finite number; drop NaN/inf (diverged) points first")
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"loss_at_compute: budget={budget!r} must be a finite number of FLOPs > 0; pass a compute "
                         "budget on the curve's compute axis")
    compute, where = np.unique(compute, return_inverse=True)  # sorted, each compute once
    loss = np.bincount(where, weights=loss) / np.bincount(where)
    if budget < compute[0] or budget > compute[-1]:
        return math.nan
    return float(np.interp(math.log(budget), np.log(compute), loss))
