"""Confidence intervals over seeds against values worked by hand."""
import math

import pytest

from tread_bench.measure.stats import format_ci, mean_ci, summarise


def test_three_seeds_t_interval_by_hand():
    # mean 2, sample sd 1, t_{0.975, 2} = 4.302653: half-width 4.302653 / sqrt(3) = 2.484138
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(2.484138, rel=1e-6)


def test_other_level_and_nan_handling():
    # 90%: t_{0.95, 3} = 2.353363; values 2, 4, 6, 8: sd 2.581989, half = 2.353363 * 2.581989 / 2
    mean, half, n = mean_ci([2, 4, float("nan"), 6, 8], confidence=0.90)
    assert (mean, n) == (5.0, 4)
    assert half == pytest.approx(2.353363 * 2.581989 / 2, rel=1e-5)
    assert math.isnan(mean_ci([5.0])[1]) and mean_ci([])[2] == 0


def test_summarise_and_format():
    row = summarise("fid", [1.0, 2.0, 3.0])
    assert set(row) == {"fid", "fid_ci95", "fid_n"} and row["fid_n"] == 3
    assert format_ci(2.0, 2.484138) == "2 ± 2.5"
    assert format_ci(float("nan"), 1.0) == "–"
