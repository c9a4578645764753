"""Intervals, and verdicts that say what an interval allows: met, missed, or inconclusive.

A point estimate against a target says nothing when the target lies inside the estimate's noise: 249 of 256
is 0.973, and its 95% interval reaches below 0.95. An accuracy gets a Wilson interval; a ratio of two
times gets an interval from interleaved repetitions (each repetition times both, so slow moments of a
shared machine hit both sides). A target is met only when the whole interval clears it, missed only when
the whole interval falls short, and otherwise the honest answer is "inconclusive".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (nan, nan) for no trials."""
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == trials else min(1.0, center + half)  # exact ends: rounding must not exclude p
    return low, high


# two-sided 95% Student t quantiles for small samples (degrees of freedom 1..30); beyond, the normal one
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]  # fmt: skip


def t95(degrees: int) -> float:
    """The two-sided 95% quantile of Student's t with `degrees` degrees of freedom."""
    return _T95[degrees - 1] if 1 <= degrees <= len(_T95) else Z95


@dataclass(frozen=True)
class Ratio:
    """A ratio a/b of paired (interleaved) measurements: geometric mean with a 95% interval, and the spread."""

    value: float
    low: float
    high: float
    spread: float  # max/min of the per-repetition ratios, 1.0 when they agree
    n: int

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.value:.2f}x (1 rep, no interval)"
        return f"{self.value:.2f}x [{self.low:.2f}-{self.high:.2f}]"


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> Ratio:
    """The ratio of two sides timed in interleaved repetitions: repetition i gives a_i / b_i, and the interval is
    the t interval of their logarithms (a ratio is multiplicative; its log is symmetric)."""
    pairs = [(a, b) for a, b in zip(numerators, denominators) if a > 0 and b > 0 and math.isfinite(a / b)]
    if not pairs:
        return Ratio(math.nan, math.nan, math.nan, math.nan, 0)
    logs = [math.log(a / b) for a, b in pairs]
    n = len(logs)
    mean = sum(logs) / n
    if n < 2:
        value = math.exp(mean)
        return Ratio(value, math.nan, math.nan, 1.0, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = t95(n - 1) * sd / math.sqrt(n)
    return Ratio(math.exp(mean), math.exp(mean - half), math.exp(mean + half), math.exp(max(logs) - min(logs)), n)


def verdict(low: float, high: float, target: float, higher_is_better: bool = True) -> str:
    """'met' when the whole interval [low, high] clears `target`, 'missed' when all of it falls short,
    else 'inconclusive' (and 'inconclusive' when there is no interval at all)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if not higher_is_better:
        low, high, target = -high, -low, -target
    if low >= target:
        return "met"
    if high < target:
        return "missed"
    return "inconclusive"
