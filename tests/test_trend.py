"""The crossover trend fit (tread_bench/measure/trend.py) against a regression worked by hand."""
import math

import pytest

from tread_bench.core.errors import ConfigError
from tread_bench.measure.trend import fit_log_trend

T_975_2 = 4.302652729911275  # Student t, 2 degrees of freedom, 97.5% quantile (tables)


def test_slope_intercept_their_intervals_and_a_prediction_match_the_hand_computation():
    # log(steps) = 0, 1, 2, 3; log(ratio) = 0.1, 0.3, 0.4, 0.7. By hand: mean log x 1.5, Sxx 5, Sxy 0.95,
    # slope 0.19, intercept 0.375 - 0.19 * 1.5 = 0.09; residuals 0.01, 0.02, -0.07, 0.04, SSE 0.007,
    # sigma^2 = 0.007 / 2; SE(slope) = sqrt(sigma^2 / 5), SE(intercept) = sqrt(sigma^2 (1/4 + 1.5^2 / 5)).
    steps = [math.exp(k) for k in range(4)]
    trend = fit_log_trend([math.exp(v) for v in (0.1, 0.3, 0.4, 0.7)], {"steps": steps})
    sigma2 = 0.007 / 2
    assert trend.terms == ["intercept", "steps"]
    assert trend.coef == pytest.approx([0.09, 0.19], abs=1e-12)
    assert trend.ci95[1] == pytest.approx(T_975_2 * math.sqrt(sigma2 / 5), rel=1e-9)
    assert trend.ci95[0] == pytest.approx(T_975_2 * math.sqrt(sigma2 * (0.25 + 2.25 / 5)), rel=1e-9)
    # at log x = 4: 0.09 + 0.76 = 0.85, prediction half-width t sigma sqrt(1 + 1/4 + (4 - 1.5)^2 / 5)
    mean, lo, hi = trend.predict({"steps": math.exp(4)})
    half = T_975_2 * math.sqrt(sigma2) * math.sqrt(1 + 0.25 + 6.25 / 5)
    assert mean == pytest.approx(0.85, abs=1e-12) and (hi - mean) == pytest.approx(half, rel=1e-9)
    assert (mean - lo) == pytest.approx(half, rel=1e-9)


def test_two_axes_recover_known_exponents_exactly():
    params = [1e6, 4e6, 1e6, 4e6, 2e6]
    tokens = [64, 64, 256, 256, 128]
    ratios = [1.05 * p ** -0.02 * t ** 0.01 for p, t in zip(params, tokens)]
    trend = fit_log_trend(ratios, {"params": params, "tokens": tokens})
    assert trend.coef == pytest.approx([math.log(1.05), -0.02, 0.01], abs=1e-12)
    assert trend.sigma == pytest.approx(0, abs=1e-12)


def test_too_few_cells_or_an_axis_that_never_varies_alone_is_one_line():
    with pytest.raises(ConfigError, match="needs at least 3 cells"):
        fit_log_trend([1.0, 1.1], {"steps": [1, 2]})
    with pytest.raises(ConfigError, match="do not vary every axis independently"):
        fit_log_trend([1.0, 1.1, 1.2, 1.3], {"params": [1, 2, 3, 4], "tokens": [1, 2, 3, 4]})
