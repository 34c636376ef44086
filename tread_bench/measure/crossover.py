"""The crossover map: per cell (a model size of a crossover suite) and evaluation step, TREAD / baseline held-out
loss at equal steps and at equal training FLOPs, and the FID difference at the cell's final step, each the mean
over paired seeds with a 95% t interval; the map figure; the log-log trend of the equal-steps ratio against
parameters, tokens and steps (tread_bench/measure/trend.py).

    python -m tread_bench.measure.crossover results/crossover_runs.csv [results/crossover_long_runs.csv ...]

writes ``crossover_cells.csv``, ``crossover_trend.md`` and ``crossover_map.png`` beside the first table."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from tread_bench.core.errors import ConfigError

from .speedup import value_at
from .stats import format_ci, mean_ci
from .trend import fit_log_trend

#: the paper's DiT-S/2 point (Krause et al., Table 2): 33M parameters, 256 tokens, 400K steps; TREAD better
PAPER_POINT = {"params": 33e6, "tokens": 256, "steps": 400_000}


def cell_shape(backbone: str, size: str) -> tuple[int, int]:
    """(width, tokens) of a registered backbone size on 32x32 inputs, from the network itself (meta device)."""
    import torch

    from backbones import build_backbone

    with torch.device("meta"):
        net = build_backbone(backbone, size, input_size=32, in_channels=1, num_classes=10)
    width = next(b for b in net.blocks[0].modules() if isinstance(b, torch.nn.Linear)).in_features
    return int(width), int(net.num_tokens)


def crossover_cells(runs: pd.DataFrame, baseline: str = "baseline", method: str = "tread") -> pd.DataFrame:
    """One row per (cell, evaluation step) both methods reached with the same seeds."""
    if "eval_loss" not in runs:
        return pd.DataFrame()
    ok = runs[(runs.status == "ok") & runs.eval_loss.notna()]
    rows = []
    for (backbone, size), cell in ok.groupby(["backbone", "size"], sort=False):
        width, tokens = cell_shape(backbone, size)
        base, other = cell[cell.method == baseline], cell[cell.method == method]
        seeds = sorted(set(base.seed) & set(other.seed))
        final = int(min(base.step.max(), other.step.max())) if seeds else 0
        for step in sorted(set(base.step) & set(other.step)):
            steps_ratio, flops_ratio, fid_diff = [], [], []
            for seed in seeds:
                b, o = base[base.seed == seed].sort_values("step"), other[other.seed == seed].sort_values("step")
                at_b, at_o = b[b.step == step], o[o.step == step]
                if at_b.empty or at_o.empty:
                    continue
                steps_ratio.append(at_o.eval_loss.iloc[0] / at_b.eval_loss.iloc[0])
                # the baseline's loss at the training FLOPs TREAD spent by this step (its curve, interpolated)
                base_at_flops = value_at(b.train_flops, b.eval_loss, at_o.train_flops.iloc[0])
                flops_ratio.append(at_o.eval_loss.iloc[0] / base_at_flops)
                if step == final and "fid" in cell and at_o.fid.notna().all() and at_b.fid.notna().all():
                    fid_diff.append(at_o.fid.iloc[0] - at_b.fid.iloc[0])
            if not steps_ratio:
                continue
            row = {"backbone": backbone, "size": size, "width": width, "tokens": tokens,
                   "params": int(cell.params.iloc[0]), "step": int(step), "seeds": len(steps_ratio)}
            for name, values in (("ratio_equal_steps", steps_ratio), ("ratio_equal_flops", flops_ratio),
                                 ("fid_diff", fid_diff)):
                mean, half, _ = mean_ci(values)
                row[name], row[f"{name}_ci95"] = mean, half
            rows.append(row)
    return pd.DataFrame(rows)


def trend_of(cells: pd.DataFrame):
    """The trend fit over the axes the cells vary (of params, tokens, steps), or None when too few cells."""
    if cells.empty:
        return None
    axes = {name: cells[name].to_numpy(float) for name in ("params", "tokens", "step") if cells[name].nunique() > 1}
    if not axes:
        return None
    try:
        return fit_log_trend(cells.ratio_equal_steps.to_numpy(float), axes)
    except ConfigError:
        return None


def trend_markdown(cells: pd.DataFrame) -> str:
    trend = trend_of(cells)
    lines = ["# Crossover trend", "",
             "log(TREAD / baseline held-out loss at equal steps) = b0 + sum_k b_k log(axis_k), least squares over "
             "every (cell, step) point; 95% t intervals. A ratio below 1 means TREAD is better.", ""]
    if trend is None:
        return "\n".join(lines + ["Too few cells varying an axis for a fit."]) + "\n"
    lines += ["| term | coefficient | 95% interval |", "|---|---|---|"]
    lines += [f"| {t} | {c:.4g} | ± {h:.2g} |" for t, c, h in zip(trend.terms, trend.coef, trend.ci95)]
    missing = [a for a in ("params", "tokens", "step") if a not in trend.terms]
    if missing:  # a prediction along some axes alone would pass for one along all three
        lines += ["", f"The cells do not vary {', '.join(missing)} yet: no prediction at the paper's DiT-S/2 point "
                  f"(33M parameters, 256 tokens, 400K steps) until every axis is varied. Residual sd {trend.sigma:.3g} "
                  f"on {trend.residual_dof} degrees of freedom."]
        return "\n".join(lines) + "\n"
    point = {"params": PAPER_POINT["params"], "tokens": PAPER_POINT["tokens"], "step": PAPER_POINT["steps"]}
    mean, lo, hi = trend.predict(point)
    verdict = ("TREAD better (ratio < 1), as the paper reports" if hi < 0 else
               "TREAD worse (ratio > 1), against the paper" if lo > 0 else "undecided: the interval spans 1")
    lines += ["", f"Extrapolated to the paper's DiT-S/2 point (33M parameters, 256 tokens, 400K steps): ratio "
              f"{math.exp(mean):.3f} (95% prediction interval {math.exp(lo):.3f} .. {math.exp(hi):.3f}): {verdict}. "
              f"Residual sd {trend.sigma:.3g} on {trend.residual_dof} degrees of freedom."]
    return "\n".join(lines) + "\n"


def plot_map(cells: pd.DataFrame, path: str | Path) -> Path:
    """Left: the equal-steps ratio at each cell's final step over (width, tokens); right: the ratio against
    parameters, tokens and steps with 95% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = cells.loc[cells.groupby(["backbone", "size"]).step.idxmax()]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    grid = final.pivot_table(index="tokens", columns="width", values="ratio_equal_steps")
    im = axes[0].imshow(grid.to_numpy(), cmap="RdBu_r", vmin=0.9, vmax=1.1, origin="lower")
    axes[0].set_xticks(range(len(grid.columns)), grid.columns)
    axes[0].set_yticks(range(len(grid.index)), grid.index)
    for (i, j), v in np.ndenumerate(grid.to_numpy()):
        if math.isfinite(v):
            axes[0].text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=9)
    axes[0].set_xlabel("width")
    axes[0].set_ylabel("tokens")
    axes[0].set_title("TREAD / baseline held-out loss, final step")
    fig.colorbar(im, ax=axes[0])
    for ax, axis, label in zip(axes[1:], ("params", "tokens", "step"), ("parameters", "tokens", "training steps")):
        if axis == "step":  # each cell's curve over its evaluation steps
            curves = [(f"{b} {s}", c) for (b, s), c in cells.groupby(["backbone", "size"], sort=False)]
        else:  # the final steps, across cells
            curves = [("final step", final)]
        for label_, cell in curves:
            cell = cell.sort_values(axis)
            ax.errorbar(cell[axis], cell.ratio_equal_steps, yerr=cell.ratio_equal_steps_ci95.fillna(0), marker="o",
                        capsize=3, label=label_)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("TREAD / baseline (equal steps)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Fashion-MNIST 32x32, DiT: where does TREAD r(2->depth-4)@0.5 pay? mean over seeds, 95% t intervals")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(tables: Sequence[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """The cells table, trend and map of the crossover runs tables ``tables``; written to ``out_dir`` (default:
    the first table's folder)."""
    frames = [pd.read_csv(t) for t in tables if Path(t).exists()]
    if not frames:
        raise ConfigError(f"no crossover runs table found among {', '.join(map(str, tables))}; run "
                          "python run_suite.py suite=crossover first")
    cells = crossover_cells(pd.concat(frames, ignore_index=True))
    out = Path(out_dir or Path(tables[0]).parent)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "crossover_cells.csv", out / "crossover_trend.md"]
    cells.to_csv(written[0], index=False)
    if cells.empty:
        written[1].write_text(trend_markdown(cells) + "\nNo cell has both methods at a common step yet.\n")
        return written
    show = cells.assign(**{c: [format_ci(m, h) for m, h in zip(cells[c], cells[f"{c}_ci95"])]
                           for c in ("ratio_equal_steps", "ratio_equal_flops", "fid_diff")})
    body = trend_markdown(cells) + "\n## Cells\n\n" + show[["backbone", "size", "width", "tokens", "params", "step",
                                                            "seeds", "ratio_equal_steps", "ratio_equal_flops",
                                                            "fid_diff"]].to_markdown(index=False) + "\n"
    written[1].write_text(body)
    if len(cells):
        written.append(plot_map(cells, out / "crossover_map.png"))
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tables", nargs="+")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    for path in write_report(args.tables, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
