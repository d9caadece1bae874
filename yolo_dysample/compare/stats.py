"""Paired statistics of a comparison: the Student-t distribution and the per-seed differences from stock.

The t distribution is computed exactly through the regularized incomplete beta function (a continued fraction
evaluated with the modified Lentz method), so the package needs no SciPy; tests check it against table values and
the closed forms for 1 and 2 degrees of freedom.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["PairedDifference", "paired_difference", "student_t_cdf", "student_t_quantile"]

_TINY = 1e-300
_EPSILON = 1e-15
_MAX_TERMS = 500


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging fast for x < (a + 1) / (a + b + 2)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    fraction = d
    for m in range(1, _MAX_TERMS + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step d_{2m}
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),  # odd step d_{2m+1}
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            fraction *= c * d
        if abs(c * d - 1.0) < _EPSILON:
            break
    return fraction


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x!r} must lie in [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b  # symmetry I_x(a,b)=1-I_{1-x}(b,a)


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df={df!r} must be > 0")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    squared = t * t
    if squared < df:  # near 0: P(|T| < |t|) = I_{t^2 / (df + t^2)}(1/2, df/2), without 1 - x cancelling to 0
        inner = 0.5 * regularized_incomplete_beta(0.5, df / 2.0, squared / (df + squared))  # P(0 < T < |t|)
        return 0.5 + inner if t > 0 else 0.5 - inner
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + squared))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(probability: float, df: float) -> float:
    """The t with P(T <= t) = ``probability`` (bisection on the cdf, to double precision)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability={probability!r} must lie in (0, 1)")
    if probability == 0.5:
        return 0.0
    if probability < 0.5:
        return -student_t_quantile(1.0 - probability, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < probability:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low <= 1e-14 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``variant - stock`` over the seeds both have, with its t-based confidence interval and p-value."""

    pairs: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    p_value: float

    @property
    def half_width(self) -> float:
        """Half the width of the confidence interval."""
        return (self.ci_high - self.ci_low) / 2


def paired_difference(
    variant: Mapping[int, float], stock: Mapping[int, float], confidence: float = 0.95
) -> PairedDifference:
    """Paired t statistics of ``variant[seed] - stock[seed]`` over the seeds in both (NaN where undefined).

    With one pair the mean is the difference and the interval and p-value are NaN; with zero spread the interval is
    the point and p is 0 (a nonzero mean) or 1.
    """
    differences = [variant[seed] - stock[seed] for seed in variant if seed in stock]
    pairs = len(differences)
    if pairs == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = statistics.fmean(differences)
    if pairs == 1:
        return PairedDifference(1, mean, math.nan, math.nan, math.nan, math.nan)
    std = statistics.stdev(differences)
    error = std / math.sqrt(pairs)
    if error == 0:
        return PairedDifference(pairs, mean, std, mean, mean, 1.0 if mean == 0 else 0.0)
    half_width = student_t_quantile(0.5 + confidence / 2, pairs - 1) * error
    p_value = 2.0 * student_t_cdf(-abs(mean) / error, pairs - 1)
    return PairedDifference(pairs, mean, std, mean - half_width, mean + half_width, min(p_value, 1.0))
