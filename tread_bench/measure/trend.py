"""A log-log trend of a per-cell ratio (e.g. TREAD / baseline eval loss) against scale axes, with its uncertainty:
ordinary least squares of log(ratio) on log(axis) for each axis, 95% intervals from the t distribution, and the
prediction (with its 95% prediction interval) at a point outside the data, such as a paper's model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from tread_bench.core.errors import ConfigError


@dataclass
class Trend:
    terms: list[str]            # "intercept", then one name per axis
    coef: np.ndarray            # fitted coefficients, in terms' order
    ci95: np.ndarray            # half-widths of their 95% intervals
    residual_dof: int
    sigma: float                # residual standard deviation
    xtx_inv: np.ndarray         # (X'X)^-1 of the design: sigma^2 times it is the coefficients' covariance

    def predict(self, point: Mapping[str, float]) -> tuple[float, float, float]:
        """(log ratio, lower, upper) at ``point`` ({axis: value}, values in the axes' units, not logs): the fitted
        mean with the 95% prediction interval of one new cell."""
        x = np.array([1.0] + [np.log(point[name]) for name in self.terms[1:]])
        mean = float(x @ self.coef)
        half = stats.t.ppf(0.975, self.residual_dof) * self.sigma * np.sqrt(1 + x @ self.xtx_inv @ x)
        return mean, mean - half, mean + half


def fit_log_trend(ratios: Sequence[float], axes: Mapping[str, Sequence[float]]) -> Trend:
    """log(ratio) = b0 + sum_k b_k log(axis_k), least squares over the cells (one ratio per cell)."""
    y = np.log(np.asarray(ratios, dtype=float))
    names = list(axes)
    X = np.column_stack([np.ones(len(y))] + [np.log(np.asarray(axes[n], dtype=float)) for n in names])
    dof = len(y) - X.shape[1]
    if dof < 1:
        raise ConfigError(f"a trend over {len(names)} axes needs at least {X.shape[1] + 1} cells, got {len(y)}")
    if np.linalg.matrix_rank(X) < X.shape[1]:
        raise ConfigError(f"the cells do not vary every axis independently ({', '.join(names)}); add cells or drop "
                          "an axis from the fit")
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    sigma = float(np.sqrt(resid @ resid / dof))
    xtx_inv = np.linalg.inv(X.T @ X)
    half = stats.t.ppf(0.975, dof) * sigma * np.sqrt(np.diag(xtx_inv))
    return Trend(["intercept", *names], coef, half, dof, sigma, xtx_inv)
