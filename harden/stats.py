"""Statistics for fault-injection campaigns (METHODS.md section 5), numpy and stdlib only.

- `summarize`: mean, sample standard deviation and a Student-t confidence interval of the
  per-trial figures (exact t quantiles, so 10 trials get the wide interval they deserve);
- `wilson`: the Wilson score interval of a proportion (sound for rare events, e.g. SDC-1 = 0);
- `leveugle_n`: Leveugle et al.'s sample size for a margin e at confidence t over a population
  of N faults with expected proportion p: n = N / (1 + e^2 (N - 1) / (t^2 p (1 - p))).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np


def z_value(confidence: float) -> float:
    """Two-sided standard-normal quantile: 1.959964 for 0.95."""
    _check_confidence(confidence)
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df (the exact finite sums, A&S 26.7.3/4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        if df == 1:
            return 2 * theta / math.pi
        term, total = 1.0, 1.0
        for k in range(1, (df - 3) // 2 + 1):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


@lru_cache(maxsize=4096)
def t_value(confidence: float, df: int) -> float:
    """Two-sided Student-t quantile: t such that P(|T_df| <= t) = confidence."""
    _check_confidence(confidence)
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    z = z_value(confidence)
    if df > 400:  # Cornish-Fisher expansion; error far below the figures' precision
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        return z + g1 / df + g2 / df**2 + g3 / df**3
    lo, hi = z, z
    while _t_central(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_central(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


@dataclass(frozen=True)
class Summary:
    """Per-trial figures summarised: n, mean, std (ddof 1), CI at `confidence`, half-width."""

    n: int
    mean: float
    std: float
    low: float | None
    high: float | None
    half_width: float | None
    confidence: float

    def as_dict(self, digits: int = 6) -> dict:
        r = (lambda v: None if v is None else round(float(v), digits))
        return {
            "mean": r(self.mean),
            "std": r(self.std),
            "ci": None if self.low is None else [r(self.low), r(self.high)],
            "half_width": r(self.half_width),
        }


def summarize(values, confidence: float = 0.95, bounds: tuple[float, float] | None = (0.0, 1.0)) -> Summary:
    """Mean, std and the t-based CI of the mean (clipped to `bounds`). One value: no CI."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        raise ValueError("no values to summarise")
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, 0.0, None, None, None, confidence)
    std = float(x.std(ddof=1))
    h = t_value(confidence, n - 1) * std / math.sqrt(n)
    lo, hi = mean - h, mean + h
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return Summary(n, mean, std, lo, hi, h, confidence)


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion successes / n."""
    if n <= 0:
        raise ValueError("n must be positive")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    z = z_value(confidence)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def leveugle_n(margin: float, confidence: float = 0.95, population: int | None = None, p: float = 0.5) -> int:
    """Trials for a margin of error `margin` at `confidence` (Leveugle et al., DATE 2009).

    population None means an unbounded fault population (random multi-fault trials, whose
    population is astronomically large): n = t^2 p (1 - p) / e^2. Rounded up.
    """
    if not 0.0 < margin < 1.0:
        raise ValueError(f"margin must be in (0, 1), got {margin!r}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    t = z_value(confidence)
    core = t * t * p * (1 - p)
    if population is None:
        return max(1, math.ceil(core / (margin * margin) - 1e-9))
    if population < 1:
        raise ValueError("population must be >= 1")
    n = population / (1 + margin * margin * (population - 1) / core)
    return max(1, min(population, math.ceil(n - 1e-9)))


def finite_population_half_width(p_hat: float, n: int, population: int, confidence: float = 0.95) -> float:
    """Leveugle's margin: t * sqrt(p(1-p)/n) * sqrt((N - n)/(N - 1))."""
    t = z_value(confidence)
    fpc = math.sqrt((population - n) / (population - 1)) if population > 1 else 0.0
    return t * math.sqrt(p_hat * (1 - p_hat) / n) * fpc
