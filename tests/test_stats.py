"""The study reports' statistics: t quantiles against printed tables, intervals, and the margin verdict."""

import statistics

import pytest

from hyft.tools.stats import Paired, paired, t_quantile


@pytest.mark.parametrize(("df", "value"), [(1, 12.706), (2, 4.303), (4, 2.776), (8, 2.306), (30, 2.042)])
def test_t_quantiles_match_the_printed_table(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)


def test_the_interval_uses_the_sample_std():
    diffs = [0.01, -0.02, 0.04]
    p = paired(diffs)
    assert p.std == pytest.approx(statistics.stdev(diffs))  # n − 1, not the population std
    half = 4.3027 * statistics.stdev(diffs) / 3 ** 0.5
    assert (p.low, p.high) == pytest.approx((p.mean - half, p.mean + half), abs=1e-4)


@pytest.mark.parametrize(("low", "high", "verdict"), [(-0.01, 0.015, "equivalent"), (0.005, 0.04, "above"),
                                                      (-0.05, -0.001, "below"), (-0.03, 0.01, "inconclusive")])
def test_the_verdict_applies_one_margin(low, high, verdict):
    assert Paired(3, (low + high) / 2, 0.01, low, high).verdict(0.02) == verdict
