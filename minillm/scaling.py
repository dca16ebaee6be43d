"""Scaling laws in small: fit loss = a * C^-b (+ c) to (compute, loss) points, and find compute-optimal sizes.

Taught in chapter 03 (pretraining). Kaplan et al. (arXiv:2001.08361) and Chinchilla (Hoffmann et al.,
arXiv:2203.15556) fit such power laws to hundreds of training runs; chapter 03 fits them to a dozen runs
on the reader's machine.

    law = fit_power_law(compute, loss)               # PowerLaw(scale=a, exponent=b, offset=c)
    law(1e15)                                        # predicted loss at 1e15 FLOPs
    n_opt = isoflop_optimum(n_params, losses)        # best size for one compute budget (IsoFLOP parabola)

Everything here is numpy on a handful of points: no optimiser library is needed. With an offset, the fit
scans the offset c below the smallest loss and, for each c, fits log(loss - c) = log a - b log C by least
squares; the c with the smallest error in log(loss) wins and is refined by golden-section search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["PowerLaw", "fit_power_law", "isoflop_optimum", "loss_at_compute"]


@dataclass(frozen=True)
class PowerLaw:
    """y = offset + scale * x ** (-exponent). A negative exponent describes a quantity that grows with x."""

    scale: float
    exponent: float
    offset: float = 0.0

    def __call__(self, x):
        values = self.offset + self.scale * np.asarray(x, dtype=float) ** (-self.exponent)
        return float(values) if np.ndim(values) == 0 else values

    def inverse(self, y: float) -> float:
        """The x at which the law reaches y (inf when y is at or below an offset the law never crosses)."""
        if self.scale == 0 or self.exponent == 0:
            raise ValueError(f"PowerLaw.inverse: {self} is constant in x (scale or exponent is 0), so no single "
                             "x reaches a given y; fit the law to points that vary with x")
        excess = (y - self.offset) / self.scale
        if excess <= 0:
            return math.inf
        return excess ** (-1.0 / self.exponent)

    def __str__(self) -> str:
        # "+ 0.0" turns -0.0 into 0.0, so an exponent of 0 prints as x^(0), not x^(-0)
        power = -self.exponent + 0.0
        offset = f" {'-' if self.offset < 0 else '+'} {abs(self.offset):.3g}" if self.offset else ""
        return f"{self.scale:.3g} * x^({power:.3g}){offset}"


def _as_points(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"fit_power_law: got {x.size} x values and {y.size} y values; pass one y per x")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("fit_power_law: every x and y must be a finite number; drop NaN/inf points first")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("fit_power_law: x (compute) and y (loss) must be > 0 for a power law")
    return x, y


def _log_linear(log_x: np.ndarray, log_y: np.ndarray) -> tuple[float, float]:
    """Least-squares line log_y = intercept + slope * log_x."""
    slope, intercept = np.polyfit(log_x, log_y, 1)
    return float(intercept), float(slope)


def fit_power_law(x, y, offset: bool = True) -> PowerLaw:
    """Fit y = a * x^-b (+ c) to points (x, y); returns PowerLaw(scale=a, exponent=b, offset=c).

    offset=False fits a straight line in log-log space (needs 2+ distinct x). offset=True also fits the
    irreducible loss c, 0 <= c < min(y) (needs 3+ distinct x); the error minimised is in log(y).
    """
    x, y = _as_points(x, y)
    distinct = np.unique(x).size
    needed = 3 if offset else 2
    if distinct < needed:
        raise ValueError(f"fit_power_law: {distinct} distinct x value(s) cannot determine "
                         f"{'a, b and c' if offset else 'a and b'}; give at least {needed}"
                         + (" or use offset=False" if offset else ""))
    log_x, log_y = np.log(x), np.log(y)
    if not offset:
        intercept, slope = _log_linear(log_x, log_y)
        return PowerLaw(scale=math.exp(intercept), exponent=-slope, offset=0.0)

    def error(c: float) -> tuple[float, PowerLaw]:
        intercept, slope = _log_linear(log_x, np.log(y - c))
        law = PowerLaw(scale=math.exp(intercept), exponent=-slope, offset=c)
        return float(np.sum((np.log(law(x)) - log_y) ** 2)), law

    ceiling = float(y.min())
    # Offsets crowd towards min(y), where the fit is most sensitive, so scan 1 - c/min(y) on a log grid.
    gaps = np.concatenate([[1.0], np.logspace(-6, 0, 400, endpoint=False)[::-1]])
    candidates = ceiling * (1.0 - gaps)
    errors = [error(c)[0] for c in candidates]
    best = int(np.argmin(errors))
    low = candidates[max(best - 1, 0)]
    high = candidates[min(best + 1, len(candidates) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):  # golden-section search inside the bracket around the best grid point
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        if error(left)[0] < error(right)[0]:
            high = right
        else:
            low = left
    refined_error, refined = error((low + high) / 2)
    grid_error, grid_law = error(candidates[best])
    return refined if refined_error <= grid_error else grid_law


def isoflop_optimum(n_params, losses) -> float:
    """The model size with the lowest loss at one compute budget (Chinchilla's IsoFLOP "approach 2").

    Fits a parabola to loss against log(n_params) and returns its minimum; when the parabola has no
    minimum inside the sizes tried (it opens downward, or the minimum lies outside), returns the best
    size tried, since extrapolating a parabola says nothing trustworthy.
    """
    sizes, values = np.asarray(n_params, dtype=float).ravel(), np.asarray(losses, dtype=float).ravel()
    if sizes.shape != values.shape or sizes.size == 0:
        raise ValueError(f"isoflop_optimum: got {sizes.size} sizes and {values.size} losses; pass one loss per size")
    if not (np.all(np.isfinite(sizes)) and np.all(np.isfinite(values))):
        raise ValueError("isoflop_optimum: every size and loss must be a finite number; drop NaN/inf points first")
    if np.any(sizes <= 0):
        raise ValueError("isoflop_optimum: sizes (parameter counts) must be > 0")
    best_tried = float(sizes[int(np.argmin(values))])
    if np.unique(sizes).size < 3:
        return best_tried
    log_sizes = np.log(sizes)
    curvature, slope, _ = np.polyfit(log_sizes, values, 2)
    if curvature <= 0:
        return best_tried
    vertex = -slope / (2 * curvature)
    if not log_sizes.min() <= vertex <= log_sizes.max():
        return best_tried
    return float(math.exp(vertex))


def loss_at_compute(compute, loss, budget: float) -> float:
    """One training curve's loss at `budget` FLOPs, interpolated linearly in log(compute); NaN outside it."""
    compute, loss = np.asarray(compute, dtype=float).ravel(), np.asarray(loss, dtype=float).ravel()
    if compute.shape != loss.shape or compute.size == 0:
        raise ValueError(f"loss_at_compute: got {compute.size} compute values and {loss.size} losses; pass one "
                         "loss per compute value, at least one point")
    if np.any(np.isnan(compute)):
        raise ValueError("loss_at_compute: a compute value is NaN; drop that point first")
    if not np.all((compute > 0) & (compute < math.inf)):
        # The interpolation is in log(compute): 0, negative or infinite compute has no place on that axis.
        raise ValueError("loss_at_compute: every compute value must be a finite number > 0 (FLOPs)")
    order = np.argsort(compute)
    compute, loss = compute[order], loss[order]
    if budget < compute[0] or budget > compute[-1]:
        return math.nan
    return float(np.interp(math.log(budget), np.log(compute), loss))
