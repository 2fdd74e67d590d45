"""Small estimators behind the equilibrium detector: pooled means, slopes, periods, with errors.

Consecutive measurement windows are not independent (momentum and the slow norm correlate them),
so every standard error here is corrected for the lag-1 autocorrelation of the residuals: with
``n`` values of autocorrelation ``r``, the effective number of independent values is about
``n (1 - r) / (1 + r)`` (the AR(1) approximation used for batch means; Lang et al. 2019 use the
same device for their stationarity test). Pure Python on short lists: the detector runs once per
window, not once per step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

__all__ = [
    "effective_count",
    "mean_with_error",
    "oscillation",
    "slope_with_error",
    "t_quantile",
]

# The AR(1) correction is capped: with fewer than a handful of values r itself is noise.
_MAX_AUTOCORRELATION = 0.9


def effective_count(residuals: Sequence[float]) -> float:
    """``n (1 - r) / (1 + r)``: independent values equivalent to ``residuals`` (at least 1).

    Example::

        >>> effective_count([1.0, -1.0, 1.0, -1.0])  # anti-correlated: no correction below n
        4.0
        >>> round(effective_count([1.0, 0.9, 0.8, -0.8, -0.9, -1.0]), 2)  # smooth: fewer
        1.84
    """
    n = len(residuals)
    if n < 3:
        return float(n)
    energy = sum(r * r for r in residuals)
    if energy == 0:
        return float(n)
    lag1 = sum(a * b for a, b in itertools.pairwise(residuals)) / energy
    r = min(max(lag1, 0.0), _MAX_AUTOCORRELATION)
    return n * (1 - r) / (1 + r)


def t_quantile(z: float, dof: float) -> float:
    """Student's t quantile matching the normal quantile ``z`` for ``dof`` degrees of freedom.

    Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5): within 2% of the exact value for
    ``dof >= 3`` at the usual ``z``; a few noisy windows then need a wider margin than ``z``.

    Example::

        >>> round(t_quantile(1.645, 3), 2), round(t_quantile(1.645, 1e9), 3)
        (2.31, 1.645)
    """
    dof = max(dof, 1.0)
    z3, z5 = z**3, z**5
    return z + (z3 + z) / (4 * dof) + (5 * z5 + 16 * z3 + 3 * z) / (96 * dof**2)


def mean_with_error(
    values: Sequence[float], weights: Sequence[float] | None = None
) -> tuple[float, float]:
    """Weighted mean and its standard error (``inf`` with fewer than two values).

    Example::

        >>> mean, error = mean_with_error([1.0, 1.2, 0.8, 1.0])
        >>> round(mean, 3), round(error, 3)
        (1.0, 0.082)
    """
    n = len(values)
    if n == 0:
        return math.nan, math.inf
    w = list(weights) if weights is not None else [1.0] * n
    total = sum(w)
    mean = sum(wi * v for wi, v in zip(w, values, strict=True)) / total
    if n < 2:
        return mean, math.inf
    residuals = [v - mean for v in values]
    variance = sum(wi * r * r for wi, r in zip(w, residuals, strict=True)) / total * n / (n - 1)
    return mean, math.sqrt(variance / effective_count(residuals))


def slope_with_error(times: Sequence[float], values: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares slope of ``values`` against ``times``, its standard error and dof.

    The degrees of freedom of the error are for :func:`t_quantile`.

    ``(0, inf, 1)`` with fewer than three points or no spread in time.

    Example::

        >>> slope, error, dof = slope_with_error([0, 1, 2, 3, 4], [0.0, 2.1, 3.9, 6.0, 8.1])
        >>> round(slope, 2), error < 0.1, dof
        (2.01, True, 3.0)
    """
    n = len(times)
    if n < 3:
        return 0.0, math.inf, 1.0
    t_mean = sum(times) / n
    y_mean = sum(values) / n
    spread = sum((t - t_mean) ** 2 for t in times)
    if spread == 0:
        return 0.0, math.inf, 1.0
    slope = sum((t - t_mean) * (y - y_mean) for t, y in zip(times, values, strict=True)) / spread
    residuals = [y - y_mean - slope * (t - t_mean) for t, y in zip(times, values, strict=True)]
    dof = max(effective_count(residuals) - 2, 1.0)
    variance = sum(r * r for r in residuals) / dof
    return slope, math.sqrt(variance / spread), dof


def oscillation(
    times: Sequence[float], values: Sequence[float], band: float, smoothing: int = 3
) -> tuple[float, float] | None:
    """``(period, amplitude)`` of a repeated swing of ``values`` around their median, or None.

    The series is first smoothed by a moving average of ``smoothing`` values, so that the scatter
    of single windows is not taken for a swing. A swing counts when the smoothed series crosses
    from below ``median - band`` to above ``median + band`` or back, where the band is at least
    twice the noise left after smoothing (estimated from successive differences); at least four
    crossings (two periods) are needed, each period at least ``2 * smoothing`` values long. The
    amplitude is half the 10th-90th percentile range of the smoothed series.

    Example::

        >>> t = list(range(0, 800, 10))
        >>> y = [1 + 0.2 * math.sin(2 * math.pi * s / 200) for s in t]
        >>> period, amplitude = oscillation(t, y, band=0.05)
        >>> round(period, -1), round(amplitude, 2)
        (200.0, 0.18)
        >>> import random
        >>> rng = random.Random(0)
        >>> oscillation(t, [1 + rng.gauss(0, 0.1) for _ in t], band=0.05) is None  # noise
        True
    """
    n = len(values)
    if n < 4 * smoothing:
        return None
    noise = math.sqrt(sum((b - a) ** 2 for a, b in itertools.pairwise(values)) / (2 * (n - 1)))
    half = smoothing // 2
    smooth = [
        sum(values[i - half : i - half + smoothing]) / smoothing for i in range(half, n - half)
    ]
    stimes = list(times[half : n - half])
    band = max(band, 2 * noise / math.sqrt(smoothing))
    ordered = sorted(smooth)
    median = ordered[len(ordered) // 2]
    side = 0
    crossings: list[float] = []
    for t, v in zip(stimes, smooth, strict=True):
        now = 1 if v > median + band else -1 if v < median - band else 0
        if now and now != side:
            if side:
                crossings.append(t)
            side = now
    if len(crossings) < 4:
        return None
    period = 2 * (crossings[-1] - crossings[0]) / (len(crossings) - 1)
    interval = (times[-1] - times[0]) / (n - 1)
    if period < 2 * smoothing * interval:
        return None
    low, high = ordered[len(ordered) // 10], ordered[(9 * len(ordered)) // 10]
    return period, (high - low) / 2
