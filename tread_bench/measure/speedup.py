"""Speedup tables and learning curves from per-evaluation run rows, summarised over seeds.

Convergence speedup (TREAD, sec. 5, and MLPerf's time-to-quality): the baseline's cost to reach its final quality
divided by the method's cost to reach that value, interpolated linearly between evaluations, per seed pair, then
mean and 95% t interval. Equal compute: ``loss_cost_ratio_<flops|time>`` and ``eval_loss_diff_equal_<flops|time>``.
Details: docs/internals.md#tread_benchmeasurespeeduppy
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .stats import format_ci, summarise


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


def value_at(times, values, t: float) -> float:
    """The piecewise-linear curve (times, values) at ``t``; NaN outside its range (no extrapolation)."""
    times, values = np.asarray(times, float), np.asarray(values, float)
    order = np.argsort(times)
    times, values = times[order], values[order]
    if len(times) == 0 or t < times[0] or t > times[-1]:
        return math.nan
    return float(np.interp(t, times, values))


def _pair_figures(b: pd.DataFrame, o: pd.DataFrame) -> dict:
    """Figures of one seed pair (baseline curve b, method curve o, both sorted by step)."""
    out = {"flop_ratio": (b.train_flops.iloc[-1] / b.step.iloc[-1]) / (o.train_flops.iloc[-1] / o.step.iloc[-1]),
           "iteration_speedup": (b.wall_time_s.iloc[-1] / b.step.iloc[-1]) / (o.wall_time_s.iloc[-1] / o.step.iloc[-1])}
    for metric in ("eval_loss", "fid"):
        if metric not in b or metric not in o:
            continue
        bm, om = b[b[metric].notna()], o[o[metric].notna()]
        common = sorted(set(bm.step) & set(om.step))
        if common:
            s = common[-1]
            vb, vo = bm.loc[bm.step == s, metric].iloc[0], om.loc[om.step == s, metric].iloc[0]
            out.update({"equal_step": s, f"{metric}_baseline": vb, f"{metric}_method": vo,
                        f"{metric}_diff": vo - vb})
        if bm.empty or len(om) < 2:  # one point on the method's curve says nothing about when it got there
            continue
        target = bm[metric].iloc[-1]
        short = "loss" if metric == "eval_loss" else "fid"
        reached = True
        for label, col in (("steps", "step"), ("flops", "train_flops"), ("time", "wall_time_s")):
            t_method = time_to_reach(om[col], om[metric], target)
            reached = t_method is not None
            out[f"{short}_speedup_{label}"] = bm[col].iloc[-1] / t_method if reached and t_method > 0 else math.nan
        out[f"{short}_reached"] = reached
        if metric == "eval_loss":
            final = om[metric].iloc[-1]
            for label, col in (("flops", "train_flops"), ("time", "wall_time_s")):
                t_base = time_to_reach(bm[col], bm[metric], final)
                cost = om[col].iloc[-1]
                out[f"loss_cost_ratio_{label}"] = t_base / cost if t_base is not None and cost > 0 else math.nan
                out[f"eval_loss_diff_equal_{label}"] = final - value_at(bm[col], bm[metric], cost)
    return out


def speedup_table(runs: pd.DataFrame, baseline: str = "baseline") -> pd.DataFrame:
    """One row per (backbone, size, non-baseline method): per-seed-pair figures summarised over seeds.

    ``runs`` has one row per run and evaluation: backbone, size, method, seed (optional, default 0), step,
    wall_time_s, train_flops, and optionally eval_loss and fid.
    """
    runs = runs if "seed" in runs else runs.assign(seed=0)
    rows = []
    for (backbone, size), group in runs.groupby(["backbone", "size"], sort=False):
        base = group[group.method == baseline]
        if base.empty:
            continue
        for method, other in group[group.method != baseline].groupby("method", sort=False):
            pairs = []
            for seed in sorted(set(base.seed) & set(other.seed)):
                b = base[base.seed == seed].sort_values("step")
                o = other[other.seed == seed].sort_values("step")
                pairs.append(_pair_figures(b, o))
            if not pairs:
                continue
            frame = pd.DataFrame(pairs)
            row = {"backbone": backbone, "size": size, "method": method, "seeds": len(pairs)}
            if "equal_step" in frame:
                row["equal_step"] = int(frame.equal_step.min())
            for col in frame.columns:
                if col in ("equal_step",) or col.endswith("_reached"):
                    continue
                row.update(summarise(col, frame[col]))
            for short in ("loss", "fid"):
                if f"{short}_reached" in frame:
                    row[f"{short}_reached"] = f"{int(frame[f'{short}_reached'].sum())}/{len(frame)}"
            rows.append(row)
    return pd.DataFrame(rows)


SPEEDUP_COLUMNS = [("flop_ratio", "FLOP ratio"), ("iteration_speedup", "step speedup"),
                   ("eval_loss_baseline", "eval loss base"), ("eval_loss_method", "eval loss method"),
                   ("eval_loss_diff", "eval loss diff"), ("fid_baseline", "FID base"), ("fid_method", "FID method"),
                   ("fid_diff", "FID diff"),
                   ("eval_loss_diff_equal_flops", "eval loss diff at equal FLOPs"),
                   ("eval_loss_diff_equal_time", "eval loss diff at equal time"),
                   ("loss_cost_ratio_flops", "cost ratio FLOPs (loss)"), ("loss_cost_ratio_time", "cost ratio time (loss)"),
                   ("loss_speedup_steps", "conv. speedup steps (loss)"),
                   ("loss_speedup_flops", "conv. speedup FLOPs (loss)"), ("loss_speedup_time", "conv. speedup time (loss)"),
                   ("fid_speedup_steps", "conv. speedup steps (FID)"), ("fid_speedup_flops", "conv. speedup FLOPs (FID)"),
                   ("fid_speedup_time", "conv. speedup time (FID)")]


def speedup_markdown(speed: pd.DataFrame) -> pd.DataFrame:
    """The speedup table with 'mean ± half-width' cells, for Markdown."""
    out = speed[[c for c in ("scale", "backbone", "size", "method", "seeds", "equal_step") if c in speed]].copy()
    for col, title in SPEEDUP_COLUMNS:
        if col in speed and speed[col].notna().any():
            half = speed.get(f"{col}_ci95", pd.Series([math.nan] * len(speed), index=speed.index))
            out[title] = [format_ci(m, h) for m, h in zip(speed[col], half)]
    for short in ("loss", "fid"):
        if f"{short}_reached" in speed:
            out[f"reached ({short})"] = speed[f"{short}_reached"].fillna("–")
    return out


def _band(curve: pd.DataFrame, metric: str, x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean x, mean metric and CI half-width per step over seeds."""
    xs, ms, hs = [], [], []
    for _, at in curve[curve[metric].notna()].groupby("step"):
        s = summarise("v", at[metric])
        xs.append(at[x].mean())
        ms.append(s["v"])
        hs.append(0.0 if not math.isfinite(s["v_ci95"]) else s["v_ci95"])
    return np.array(xs), np.array(ms), np.array(hs)


#: what each plotted metric is, for axis labels a reader understands without the code
METRIC_LABELS = {"eval_loss": "held-out loss (EMA model, objective's weighting)", "fid": "FID (EMA model)"}


def plot_curves(runs: pd.DataFrame, path_prefix: str, baseline: str = "baseline", dataset: str = "",
                time_note: str = "") -> list[str]:
    """Evaluation loss (and FID) against steps, training FLOPs and training time, one figure per backbone:
    the mean over seeds with a 95% t-interval band. ``dataset`` goes into the title; ``time_note`` (e.g. that runs
    shared the machine) into the training-time axis label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = runs if "seed" in runs else runs.assign(seed=0)
    metrics = [m for m in ("eval_loss", "fid") if m in runs and runs[m].notna().any()]
    written = []
    if not metrics:
        return written
    axes_x = [("step", "training steps", 1.0), ("train_flops", "training compute (TFLOPs, MAC convention, fwd+bwd)", 1e12),
              ("wall_time_s", "training time (s, evaluation excluded)" + (f"\n{time_note}" if time_note else ""), 1.0)]
    for (backbone, size), group in runs.groupby(["backbone", "size"], sort=False):
        fig, axes = plt.subplots(len(metrics), 3, figsize=(15, 4 * len(metrics)), squeeze=False)
        for r, metric in enumerate(metrics):
            for method, curve in group.groupby("method", sort=False):
                for c, (x, label, unit) in enumerate(axes_x):
                    xs, ms, hs = _band(curve, metric, x)
                    if not len(xs):
                        continue
                    ax = axes[r][c]
                    style = "--" if method == baseline else "-"
                    n = curve.seed.nunique()
                    setting = str(curve.setting.iloc[0]) if "setting" in curve else ""
                    name = f"{method} {setting}" if setting and setting not in ("none", "nan") else method
                    if len(xs) == 1:  # one evaluation (e.g. FID at the final step only): a point with its interval
                        ax.errorbar(xs / unit, ms, yerr=hs, fmt="o", capsize=4, label=f"{name} (n={n})")
                    else:
                        line, = ax.plot(xs / unit, ms, style, marker="o", ms=3, label=f"{name} (n={n})")
                        ax.fill_between(xs / unit, ms - hs, ms + hs, color=line.get_color(), alpha=0.2)
                    ax.set_xlabel(label)
                    samples = ""
                    if metric == "fid" and "fid_samples" in curve and curve.fid_samples.notna().any():
                        samples = f", {int(curve.fid_samples.dropna().iloc[0])} samples"
                    ax.set_ylabel(METRIC_LABELS.get(metric, metric.replace("_", " ")).replace(")", f"{samples})", 1))
                    ax.grid(alpha=0.3)
            for ax in axes[r]:
                if ax.lines or ax.containers:
                    ax.legend(fontsize=8)
        if "eval_loss" in metrics:
            for ax in axes[0]:  # the interesting part is the slow phase, not the first evaluation
                values = group.eval_loss.dropna()
                if len(values) > 3:
                    ax.set_ylim(values.min() * 0.98, np.quantile(values, 0.9))
        fig.suptitle(f"{dataset + ': ' if dataset else ''}{backbone} {size}, "
                     f"{' and '.join(METRIC_LABELS.get(m, m).split(' (')[0] for m in metrics)}: mean over seeds, "
                     "band / bar = 95% t interval")
        fig.tight_layout()
        path = f"{path_prefix}_{backbone}-{str(size).replace('/', '')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def sample_figures(runs: pd.DataFrame, path_prefix: str, baseline: str = "baseline") -> list[str]:
    """Per backbone: the sample grids of every method side by side at the same (final) step and seed."""
    from .samples import side_by_side

    written = []
    if "grid" not in runs or runs.grid.isna().all():
        return written
    runs = runs if "seed" in runs else runs.assign(seed=0)
    for (backbone, size), group in runs[runs.grid.notna()].groupby(["backbone", "size"], sort=False):
        seeds = set.intersection(*(set(g.seed) for _, g in group.groupby("method")))
        if not seeds:
            continue
        seed = min(seeds)
        at_seed = group[group.seed == seed]
        step = min(g.step.max() for _, g in at_seed.groupby("method"))
        chosen = at_seed[at_seed.step == step]
        order = sorted(chosen.method.unique(), key=lambda m: (m != baseline, m))
        paths, titles = [], []
        for method in order:
            row = chosen[chosen.method == method].iloc[0]
            if Path(str(row.grid)).exists():
                paths.append(row.grid)
                titles.append(f"{method}: {row.setting}")
        if len(paths) < 2:
            continue
        out = f"{path_prefix}_samples_{backbone}-{str(size).replace('/', '')}.png"
        side_by_side(paths, titles, out, f"{backbone} {size}, step {step}, seed {seed}: same noise and labels "
                                         "(columns = classes)")
        written.append(out)
    return written
