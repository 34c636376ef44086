"""The crossover trend fit (tread_bench/measure/trend.py), clustered by seed pair, against regressions worked by
hand: the steps of one run are not independent evidence, so repeating them must not narrow an interval."""
import math

import numpy as np
import pytest
from scipy import stats

from tread_bench.core.errors import ConfigError
from tread_bench.measure.trend import fit_log_trend

T_975_2 = 4.302652729911275  # Student t, 2 degrees of freedom, 97.5% quantile (tables)


def _three_pairs(repeats=2, spread=0.01):
    """Three seed pairs (clusters) at log(params) 0, 1, 2 whose points sit at cluster means 0.1, 0.3, 0.35 in log
    ratio, ``repeats`` points each at mean +- spread (their steps: strongly correlated within the pair)."""
    ratios, params, clusters = [], [], []
    for g, (x, mean) in enumerate(zip((0, 1, 2), (0.1, 0.3, 0.35))):
        for k in range(repeats):
            offset = spread * (1 if k % 2 == 0 else -1) if repeats % 2 == 0 else 0.0
            ratios.append(math.exp(mean + offset))
            params.append(math.exp(x))
            clusters.append(("cell", g))
    return ratios, {"params": params}, clusters


def test_slope_and_its_clustered_interval_match_the_hand_computation():
    # With x constant within a pair and pairs of equal size, least squares equals the fit to the pair means:
    # mean x 1, Sxx 2, mean y 0.25, Sxy (-1)(-0.15) + 1 (0.1) = 0.25: slope 0.125, intercept 0.125. Mean residuals
    # -0.025, 0.05, -0.025. The sandwich per pair: (X_g'u_g) = m u_g (1, x_g), so
    # Var(slope) = G/(G-1) sum_g (x_g - 1)^2 u_g^2 / Sxx^2 = 1.5 (0.000625 + 0.000625) / 4 = 0.00046875.
    trend = fit_log_trend(*_three_pairs())
    assert trend.coef == pytest.approx([0.125, 0.125], abs=1e-12)
    assert trend.clusters == 3 and trend.dof == 2 and trend.points == 6
    assert trend.ci95[1] == pytest.approx(T_975_2 * math.sqrt(0.00046875), rel=1e-9)
    # The whole covariance: (X'X)^-1 = [[5/12, -1/4], [-1/4, 1/4]], pair scores 2 u_g (1, x_g) = (-0.05, 0),
    # (0.1, 0.1), (-0.05, -0.1), their outer products summed [[0.015, 0.015], [0.015, 0.02]]; sandwich times 1.5:
    # [[0.00109375, -0.00046875], [-0.00046875, 0.00046875]]. At log(params) = 3: fitted 0.125 + 0.375 = 0.5,
    # x'Vx = 0.00109375 - 6 (0.00046875) + 9 (0.00046875) = 0.0025, half-width t_2 * 0.05.
    assert trend.cov == pytest.approx(np.array([[0.00109375, -0.00046875], [-0.00046875, 0.00046875]]), abs=1e-15)
    mean, lo, hi = trend.predict({"params": math.exp(3)})
    assert mean == pytest.approx(0.5, abs=1e-12)
    assert hi - mean == pytest.approx(T_975_2 * 0.05, rel=1e-9) and mean - lo == pytest.approx(T_975_2 * 0.05, rel=1e-9)


def test_repeating_the_steps_of_a_run_does_not_narrow_the_interval():
    two = fit_log_trend(*_three_pairs(repeats=2))
    ten = fit_log_trend(*_three_pairs(repeats=10))
    assert ten.coef == pytest.approx(two.coef, abs=1e-12)
    assert ten.ci95 == pytest.approx(two.ci95, rel=1e-12)
    # ordinary least squares over the 30 points, as if each were a run, claims a far narrower slope interval
    ratios, axes, _ = _three_pairs(repeats=10)
    y, x = np.log(ratios), np.log(axes["params"])
    X = np.column_stack([np.ones_like(x), x])
    resid = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
    naive = stats.t.ppf(0.975, len(y) - 2) * math.sqrt(resid @ resid / (len(y) - 2) * np.linalg.inv(X.T @ X)[1, 1])
    assert naive < ten.ci95[1] / 3


def test_an_intercept_alone_is_the_t_interval_over_seed_pairs():
    # one cell, four seed pairs, three steps each: the mean of all points and the t interval of the pair means
    pair_means = [0.02, 0.05, -0.01, 0.06]
    ratios, clusters = [], []
    for g, m in enumerate(pair_means):
        for d in (-0.004, 0.0, 0.004):
            ratios.append(math.exp(m + d))
            clusters.append(g)
    fit = fit_log_trend(ratios, {}, clusters)
    sd = np.std(pair_means, ddof=1)
    assert fit.coef[0] == pytest.approx(np.mean(pair_means), abs=1e-12) and fit.points == 12
    assert fit.ci95[0] == pytest.approx(stats.t.ppf(0.975, 3) * sd / 2, rel=1e-9)


def test_too_few_seed_pairs_or_an_axis_that_never_varies_alone_is_one_line():
    with pytest.raises(ConfigError, match="needs at least 3 seed pairs"):
        fit_log_trend([1.0, 1.1, 1.2], {"steps": [1, 2, 3]}, [0, 0, 1])
    with pytest.raises(ConfigError, match="do not vary every axis independently"):
        fit_log_trend([1.0, 1.1, 1.2, 1.3], {"params": [1, 2, 3, 4], "tokens": [1, 2, 3, 4]}, [0, 1, 2, 3])
