"""Intervals and verdicts: a target is met only when the whole interval clears it."""

from __future__ import annotations

import math

import pytest

from pipeline.stats import paired_ratio, verdict, wilson


def test_wilson_interval_matches_known_values():
    low, high = wilson(249, 256)  # the holdout's 0.973 of an earlier README
    assert low == pytest.approx(0.9446, abs=2e-4) and high == pytest.approx(0.9867, abs=2e-4)
    assert wilson(32, 32)[1] == 1.0 and wilson(32, 32)[0] == pytest.approx(0.8928, abs=2e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=2e-4)
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_wilson_narrows_with_more_trials_and_always_holds_the_estimate():
    for n in (8, 32, 256, 1024):
        for k in range(0, n + 1, max(1, n // 8)):
            low, high = wilson(k, n)
            assert low <= k / n <= high
    assert wilson(900, 1000)[1] - wilson(900, 1000)[0] < wilson(90, 100)[1] - wilson(90, 100)[0]


def test_paired_ratio_of_interleaved_repetitions():
    exact = paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert exact.value == pytest.approx(2.0) and exact.low == pytest.approx(2.0) and exact.high == pytest.approx(2.0)
    assert exact.spread == pytest.approx(1.0) and exact.n == 3
    noisy = paired_ratio([3.0, 3.3, 2.9, 3.1], [1.0, 1.05, 1.0, 1.1])
    assert noisy.low < noisy.value < noisy.high and noisy.spread > 1
    assert 2.5 < noisy.low and noisy.high < 3.5
    one = paired_ratio([3.0], [1.0])
    assert one.value == pytest.approx(3.0) and math.isnan(one.low) and "no interval" in str(one)


def test_verdicts_say_met_missed_or_inconclusive():
    assert verdict(0.96, 0.99, 0.95) == "met"
    assert verdict(0.90, 0.94, 0.95) == "missed"
    assert verdict(0.94, 0.99, 0.95) == "inconclusive"
    assert verdict(math.nan, 1.0, 0.5) == "inconclusive"
    # lower is better (a time ratio that must stay under 1.2)
    assert verdict(1.05, 1.15, 1.2, higher_is_better=False) == "met"
    assert verdict(1.25, 1.4, 1.2, higher_is_better=False) == "missed"
    assert verdict(1.1, 1.3, 1.2, higher_is_better=False) == "inconclusive"
