"""Paired comparisons for study reports: sample std, Student-t confidence intervals of a mean difference, and
a verdict against an equivalence margin stated before reading the results (TOST-style, by interval)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def t_pdf(x: float, df: int) -> float:
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + x * x / df) ** (-(df + 1) / 2)


def t_cdf(x: float, df: int) -> float:
    """P(T ≤ x) for Student's t with ``df`` degrees of freedom (Simpson's rule from 0; exact to ~1e-10)."""
    if x < 0:
        return 1 - t_cdf(-x, df)
    n = 2000
    h = x / n
    area = t_pdf(0, df) + t_pdf(x, df) + sum((4 if i % 2 else 2) * t_pdf(i * h, df) for i in range(1, n))
    return 0.5 + area * h / 3


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`), e.g. 4.303 for p 0.975, df 2."""
    lo, hi = 0.0, 1000.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2 if p >= 0.5 else -t_quantile(1 - p, df)


@dataclass(frozen=True)
class Paired:
    """Mean of n paired differences, their sample std, and the 95 % t-interval of the mean."""

    n: int
    mean: float
    std: float
    low: float
    high: float

    def verdict(self, margin: float) -> str:
        """``equivalent`` (the interval lies inside ±margin), ``above``/``below`` (it excludes 0 on that
        side and leaves the margin), or ``inconclusive`` (too wide to say either); one pair: ``n = 1``."""
        if self.n < 2:
            return "n = 1"
        if -margin <= self.low and self.high <= margin:
            return "equivalent"
        if self.low > 0:
            return "above"
        if self.high < 0:
            return "below"
        return "inconclusive"

    def describe(self, fmt: str = "+.3f") -> str:
        if self.n < 2:
            return f"{self.mean:{fmt}} (n = 1)"
        return f"{self.mean:{fmt}} ± {self.std:.3f} [{self.low:{fmt}}, {self.high:{fmt}}]"


def paired(diffs: list[float], level: float = 0.95) -> Paired:
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return Paired(n, mean, 0.0, mean, mean)
    sd = statistics.stdev(diffs)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Paired(n, mean, sd, mean - half, mean + half)
