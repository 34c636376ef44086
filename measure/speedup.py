"""Speedup tables from per-evaluation run curves, as the paper defines them.

Convergence speedup (TREAD, sec. 5): the baseline's training time to reach its best FID, divided by
TREAD's training time to reach that same FID. Times to reach a value are interpolated linearly
between evaluations; a method that never reaches the value gets "not reached".
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

NOT_REACHED = "not reached"


def time_to_reach(times, values, target: float) -> Optional[float]:
    """First time at which the piecewise-linear curve (times, values) drops to ``target`` or below."""
    times, values = np.asarray(times, float), np.asarray(values, float)
    order = np.argsort(times)
    times, values = times[order], values[order]
    for k in range(len(values)):
        if values[k] <= target:
            if k == 0 or values[k - 1] == values[k]:
                return float(times[k])
            frac = (values[k - 1] - target) / (values[k - 1] - values[k])
            return float(times[k - 1] + frac * (times[k] - times[k - 1]))
    return None


def convergence_speedup(base_t, base_fid, tread_t, tread_fid):
    """(speedup or NOT_REACHED, baseline best FID, baseline time to best, TREAD time to it)."""
    base_fid = np.asarray(base_fid, float)
    best = float(np.nanmin(base_fid))
    t_base = time_to_reach(base_t, base_fid, best)
    t_tread = time_to_reach(tread_t, tread_fid, best)
    if t_tread is None or t_base is None:
        return NOT_REACHED, best, t_base, t_tread
    return (t_base / t_tread if t_tread > 0 else math.inf), best, t_base, t_tread


def speedup_table(runs: pd.DataFrame, baseline: str = "baseline", time_col: str = "wall_time_s") -> pd.DataFrame:
    """One row per (backbone, size, non-baseline method) from a runs table with one row per evaluation.

    Needs columns backbone, size, method, step, wall_time_s, train_flops and optionally fid.
    """
    rows = []
    for (backbone, size), group in runs.groupby(["backbone", "size"], sort=False):
        base = group[group.method == baseline].sort_values("step")
        if base.empty:
            continue
        for method, other in group[group.method != baseline].groupby("method", sort=False):
            other = other.sort_values("step")
            row = {"backbone": backbone, "size": size, "method": method}
            last_b, last_o = base.iloc[-1], other.iloc[-1]
            row["flop_ratio"] = (last_b.train_flops / last_b.step) / (last_o.train_flops / last_o.step)
            row["iteration_speedup"] = (last_b[time_col] / last_b.step) / (last_o[time_col] / last_o.step)
            if "fid" in group and base.fid.notna().any() and other.fid.notna().any():
                common = sorted(set(base.step[base.fid.notna()]) & set(other.step[other.fid.notna()]))
                if common:
                    s = common[-1]
                    row["equal_step"] = s
                    row["fid_baseline"] = base.loc[base.step == s, "fid"].iloc[0]
                    row["fid_method"] = other.loc[other.step == s, "fid"].iloc[0]
                b, o = base[base.fid.notna()], other[other.fid.notna()]
                for label, col in (("time", time_col), ("flops", "train_flops")):
                    speed, best, _, _ = convergence_speedup(b[col], b.fid, o[col], o.fid)
                    row[f"convergence_speedup_{label}"] = speed
                row["baseline_best_fid"] = best
            rows.append(row)
    return pd.DataFrame(rows)


def plot_curves(runs: pd.DataFrame, path_prefix: str, baseline: str = "baseline") -> list[str]:
    """FID against training time and against training FLOPs, all methods on one plot per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "fid" not in runs or runs.fid.notna().sum() == 0:
        return written
    for (backbone, size), group in runs.groupby(["backbone", "size"], sort=False):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for method, curve in group[group.fid.notna()].groupby("method", sort=False):
            curve = curve.sort_values("step")
            style = "--" if method == baseline else "-"
            axes[0].plot(curve.wall_time_s, curve.fid, style, marker="o", label=method)
            axes[1].plot(curve.train_flops / 1e12, curve.fid, style, marker="o", label=method)
        axes[0].set_xlabel("training time (s)")
        axes[1].set_xlabel("training compute (TFLOPs, MAC convention, fwd+bwd)")
        for ax in axes:
            ax.set_ylabel("FID")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{backbone} {size}")
        fig.tight_layout()
        path = f"{path_prefix}_{backbone}-{str(size).replace('/', '')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
