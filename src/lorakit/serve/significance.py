"""The statistics of an A/B report: 95% confidence intervals and whether two variants differ yet.

Rates (a variant's share of preferred answers, k of n):
    Wilson score interval   (p̂ + z²/2n ± z·sqrt(p̂(1-p̂)/n + z²/4n²)) / (1 + z²/n),  z = 1.96
    two-proportion z-test   z = (p̂₁ - p̂₂) / sqrt(p̂(1-p̂)(1/n₁ + 1/n₂)),  p̂ pooled,  p = 2·(1 - Φ(|z|))
Means (scores):
    t interval              x̄ ± t₀.₉₇₅,ₙ₋₁ · s/√n
    Welch's t-test          t = (x̄₁ - x̄₂) / sqrt(s₁²/n₁ + s₂²/n₂),  ν by Welch-Satterthwaite,  p = 2·(1 - F_ν(|t|))

Student's t distribution is computed here (its CDF through the regularized incomplete beta function, by
the continued fraction of Numerical Recipes §6.4), so the server needs no SciPy; tests compare it with
known quantiles. A difference is "significant" when p < ALPHA.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

ALPHA = 0.05
Z95 = 1.959963984540054  # the standard normal's 0.975 quantile


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-14:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1 - front * _beta_fraction(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's t (bisection on the CDF; p in (0, 1))."""
    low, high = -1e3, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def wilson(successes: int, n: int, z: float = Z95) -> Optional[tuple[float, float]]:
    """The Wilson score interval of a rate (None without observations)."""
    if n == 0:
        return None
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return (centre - spread) / scale, (centre + spread) / scale


def mean_interval(values: Sequence[float]) -> Optional[tuple[float, float]]:
    """The t interval of a mean (None with fewer than two values)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    half = t_quantile(0.975, n - 1) * math.sqrt(_variance(values) / n)
    return mean - half, mean + half


def two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> Optional[float]:
    """The two-sided p-value of the two-proportion z-test (None when it is undefined)."""
    if n1 == 0 or n2 == 0:
        return None
    pooled = (k1 + k2) / (n1 + n2)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if spread == 0:
        return None if k1 / n1 == k2 / n2 else 0.0
    return 2 * (1 - normal_cdf(abs((k1 / n1 - k2 / n2) / spread)))


def welch_p(first: Sequence[float], second: Sequence[float]) -> Optional[float]:
    """The two-sided p-value of Welch's t-test (None with fewer than two values on a side, or no spread)."""
    n1, n2 = len(first), len(second)
    if n1 < 2 or n2 < 2:
        return None
    v1, v2 = _variance(first) / n1, _variance(second) / n2
    difference = sum(first) / n1 - sum(second) / n2
    if v1 + v2 == 0:
        return None if difference == 0 else 0.0
    df = (v1 + v2) ** 2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
    return 2 * (1 - t_cdf(abs(difference) / math.sqrt(v1 + v2), df))


def _variance(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)
