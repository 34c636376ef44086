"""A log-log trend of a paired ratio (TREAD / baseline held-out loss) against scale axes whose unit of evidence is
the independent run: least squares of log(ratio) on log(axis) over every (cell, seed pair, step) point, with
cluster-robust errors by seed pair, because the steps of one run are not independent (their deviations from the
mean curve correlate 0.96-0.99 at 900 / 1,200 / 1,500 steps in the committed XS/4 cell).

The covariance is the sandwich (X'X)^-1 [sum_g (X_g' u_g)(X_g' u_g)'] (X'X)^-1 times G / (G - 1), G the number of
seed pairs, and intervals use Student t with G - 1 degrees of freedom (Cameron & Miller, "A Practitioner's Guide
to Cluster-Robust Inference", 2015, sections II.C and VI). Without the (N - 1) / (N - K) factor some packages
add, evaluating a run at more steps leaves the interval exactly as it is: only more seed pairs narrow it. With
one point per cluster and an intercept alone it is the t interval of the mean of the pairs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np
from scipy import stats

from tread_bench.core.errors import ConfigError


@dataclass
class Trend:
    terms: list[str]            # "intercept", then one name per axis
    coef: np.ndarray            # fitted coefficients, in terms' order
    cov: np.ndarray             # their cluster-robust covariance
    clusters: int               # seed pairs (G)
    points: int                 # (cell, seed pair, step) points (N)

    @property
    def dof(self) -> int:
        return self.clusters - 1

    @property
    def ci95(self) -> np.ndarray:
        """Half-widths of the coefficients' 95% intervals."""
        return stats.t.ppf(0.975, self.dof) * np.sqrt(np.diag(self.cov))

    def predict(self, point: Mapping[str, float]) -> tuple[float, float, float]:
        """(log ratio, lower, upper) of the fitted trend at ``point`` ({axis: value}, values in the axes' units, not
        logs): the 95% interval of the fitted mean there, not of one new run."""
        x = np.array([1.0] + [np.log(point[name]) for name in self.terms[1:]])
        mean = float(x @ self.coef)
        half = float(stats.t.ppf(0.975, self.dof) * np.sqrt(x @ self.cov @ x))
        return mean, mean - half, mean + half


def fit_log_trend(ratios: Sequence[float], axes: Mapping[str, Sequence[float]],
                  clusters: Sequence[Hashable]) -> Trend:
    """log(ratio) = b0 + sum_k b_k log(axis_k), least squares over the points; ``clusters`` names each point's
    seed pair (e.g. (cell, seed)): the errors are clustered by it."""
    y = np.log(np.asarray(ratios, dtype=float))
    names = list(axes)
    X = np.column_stack([np.ones(len(y))] + [np.log(np.asarray(axes[n], dtype=float)) for n in names])
    labels = list(clusters)
    if len(labels) != len(y):
        raise ConfigError(f"{len(y)} ratios but {len(labels)} cluster labels")
    groups: dict = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    G = len(groups)
    if G < X.shape[1] + 1:
        raise ConfigError(f"a trend over {len(names)} axes needs at least {X.shape[1] + 1} seed pairs, got {G}")
    if np.linalg.matrix_rank(X) < X.shape[1]:
        raise ConfigError(f"the cells do not vary every axis independently ({', '.join(names)}); add cells or drop "
                          "an axis from the fit")
    xtx_inv = np.linalg.inv(X.T @ X)
    coef = xtx_inv @ X.T @ y
    resid = y - X @ coef
    meat = np.zeros((X.shape[1], X.shape[1]))
    for rows in groups.values():
        score = X[rows].T @ resid[rows]
        meat += np.outer(score, score)
    cov = xtx_inv @ meat @ xtx_inv * G / (G - 1)
    return Trend(["intercept", *names], coef, cov, G, len(y))
