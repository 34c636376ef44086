"""The crossover map: where TREAD starts to pay, over model size, tokens, tokens per step and training length.

A cell is one (backbone, size, batch, training length); cells that differ in any of them never merge. Its unit of
evidence is the seed pair (baseline seed s, TREAD seed s). Per cell and TREAD evaluation step: the TREAD /
baseline held-out loss ratio at equal steps and at equal training FLOPs, and the FID (KID) difference, each the
mean over seed pairs with a 95% t interval. Equal FLOPs compares two evaluations (the baseline evaluates where its
FLOPs equal TREAD's: suite.eval.flop_match, tread_bench/engine/eval_steps.py), never an interpolated curve. Steps
inside the EMA warm-up (decay^step above 2%: the EMA still holds that much of the initial weights) stay in the
table, marked, and out of the trend; at equal FLOPs that is also where the baseline's matched (earlier) step is
inside it. The trend (tread_bench/measure/trend.py) is clustered by seed pair.

    python -m tread_bench.measure.crossover results/crossover_runs.csv results/crossover_batch_runs.csv ...

writes ``crossover_cells.csv``, ``crossover_trend.md`` and ``crossover_map.png`` beside the first table."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from tread_bench.core.errors import ConfigError

from .stats import format_ci, mean_ci
from .trend import fit_log_trend

#: the paper's DiT-S/2 point (Krause et al., Table 2): 33M parameters, 256 tokens, batch 256, 400K steps; TREAD better
PAPER_POINT = {"params": 33e6, "tokens": 256, "tokens_per_step": 256 * 256, "step": 400_000}
#: the trend's axes, in the order they enter the fit
AXES = ("params", "tokens", "tokens_per_step", "step")
#: what the EMA may still hold of the initial weights at a step the trend uses
EMA_WARMUP_LEFT = 0.02
CELL_KEY = ["backbone", "size", "batch", "train_steps"]
#: seed pairs a cell needs to enter the trend (the protocol's minimum per cell)
MIN_PAIRS = 3


def cell_shape(backbone: str, size: str) -> tuple[int, int]:
    """(width, tokens) of a registered backbone size on 32x32 inputs, from the network itself (meta device)."""
    import torch

    from backbones import build_backbone

    with torch.device("meta"):
        net = build_backbone(backbone, size, input_size=32, in_channels=1, num_classes=10)
    width = next(b for b in net.blocks[0].modules() if isinstance(b, torch.nn.Linear)).in_features
    return int(width), int(net.num_tokens)


def in_ema_warmup(step: int, ema_decay: float) -> bool:
    return ema_decay ** step > EMA_WARMUP_LEFT


def with_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished evaluation rows with their cell's batch (images per step) and training length."""
    if "eval_loss" not in runs:
        return pd.DataFrame()
    ok = runs[(runs.status == "ok") & runs.step.notna()].copy()
    ok["batch"] = (ok.images_seen / ok.step).round().astype(int)
    ok["train_steps"] = ok.steps.astype(int)
    return ok


def cell_label(backbone: str, size: str, batch: int, train_steps: int) -> str:
    return f"{backbone} {size} b{batch} {train_steps}"


def _matched(base: pd.DataFrame, flops: float) -> pd.Series | None:
    """The baseline evaluation whose training FLOPs equal ``flops`` to within half a step's."""
    per_step = (base.train_flops / base.step).iloc[0]
    gap = (base.train_flops - flops).abs()
    return base.loc[gap.idxmin()] if gap.min() <= per_step / 2 else None


def pair_points(runs: pd.DataFrame, baseline: str = "baseline", method: str = "tread") -> pd.DataFrame:
    """One row per (cell, seed pair, TREAD evaluation step): the ratios and differences of that pair."""
    ok = with_cells(runs)
    rows = []
    for key, cell in ok.groupby(CELL_KEY, sort=False):
        base_all, other_all = cell[cell.method == baseline], cell[cell.method == method]
        for seed in sorted(set(base_all.seed) & set(other_all.seed)):
            b, o = base_all[base_all.seed == seed], other_all[other_all.seed == seed]
            for _, at_o in o.sort_values("step").iterrows():
                at_b = b[b.step == at_o.step]
                row = dict(zip(CELL_KEY, key), params=int(cell.params.iloc[0]), seed=int(seed), step=int(at_o.step),
                           flops=float(at_o.train_flops))
                same = at_b.iloc[0] if len(at_b) else None
                equal = _matched(b, at_o.train_flops)
                row["baseline_step_equal_flops"] = int(equal.step) if equal is not None else math.nan
                for metric in ("eval_loss", "fid", "kid"):
                    mine = at_o.get(metric, math.nan)
                    for tag, ref in (("equal_steps", same), ("equal_flops", equal)):
                        theirs = ref.get(metric, math.nan) if ref is not None else math.nan
                        if metric == "eval_loss":
                            row[f"ratio_{tag}"] = mine / theirs
                        else:
                            row[f"{metric}_diff_{tag}"] = mine - theirs
                rows.append(row)
    return pd.DataFrame(rows)


SUMMARISED = ("ratio_equal_steps", "ratio_equal_flops", "fid_diff_equal_steps", "fid_diff_equal_flops",
              "kid_diff_equal_steps", "kid_diff_equal_flops")


def crossover_cells(runs: pd.DataFrame, baseline: str = "baseline", method: str = "tread",
                    ema_decay: float = 0.995) -> pd.DataFrame:
    """One row per (cell, TREAD evaluation step): each figure's mean over seed pairs and its 95% t half-width."""
    points = pair_points(runs, baseline, method)
    if points.empty:
        return pd.DataFrame()
    rows = []
    for (backbone, size, batch, train_steps, step), at in points.groupby(CELL_KEY + ["step"], sort=False):
        width, tokens = cell_shape(backbone, size)
        row = {"cell": cell_label(backbone, size, batch, train_steps), "backbone": backbone, "size": size,
               "width": width, "tokens": tokens, "batch": int(batch), "tokens_per_step": tokens * int(batch),
               "train_steps": int(train_steps), "params": int(at.params.iloc[0]), "step": int(step),
               "ema_warmup": in_ema_warmup(int(step), ema_decay), "seed_pairs": len(at)}
        # equal FLOPs compares TREAD's step with the baseline's earlier one: the earlier one's EMA decides
        matched = at.baseline_step_equal_flops.dropna()
        row["baseline_step_equal_flops"] = int(matched.min()) if len(matched) else math.nan
        row["ema_warmup_equal_flops"] = row["ema_warmup"] or (len(matched) > 0
                                                             and in_ema_warmup(int(matched.min()), ema_decay))
        for name in SUMMARISED:
            mean, half, n = mean_ci(at[name])
            row[name], row[f"{name}_ci95"], row[f"{name}_n"] = mean, half, n
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["tokens_per_step", "params", "train_steps", "step"], kind="stable")


def warmup_column(metric: str) -> str:
    """The cells table's column that marks where ``metric`` compares an evaluation inside an EMA warm-up."""
    return "ema_warmup_equal_flops" if metric.endswith("equal_flops") else "ema_warmup"


def trend_of(points: pd.DataFrame, cells: pd.DataFrame, ratio: str = "ratio_equal_steps"):
    """The clustered fit of log(``ratio``) over the axes the cells vary independently (of params, tokens, tokens per
    step, steps), on the (cell, seed pair, step) points outside the EMA warm-up (at equal FLOPs, the baseline's
    matched step too) of the cells with at least MIN_PAIRS seed pairs; None when too few seed pairs or axes. A cell of one pair would set its axis's slope
    alone, with no spread between pairs to say how far to trust it."""
    if points.empty or cells.empty:
        return None
    enough = cells[cells.seed_pairs >= MIN_PAIRS][CELL_KEY].drop_duplicates()
    points = points.merge(enough, on=CELL_KEY)
    shape = cells.drop_duplicates(CELL_KEY).set_index(CELL_KEY)[["tokens", "tokens_per_step"]]
    keep = cells[~cells[warmup_column(ratio)]][CELL_KEY + ["step"]]
    data = points.merge(keep, on=CELL_KEY + ["step"]).join(shape, on=CELL_KEY)
    data = data[np.isfinite(data[ratio])]
    if data.empty:
        return None
    axes, design = {}, [np.ones(len(data))]
    for name in AXES:  # an axis enters when it varies apart from those before it (tokens per step needs a batch cell)
        values = data[name].to_numpy(float)
        if np.linalg.matrix_rank(np.column_stack(design + [np.log(values)])) > len(design):
            axes[name] = values
            design.append(np.log(values))
    if not axes:
        return None
    clusters = [(*k, s) for k, s in zip(data[CELL_KEY].itertuples(index=False), data.seed)]
    try:
        return fit_log_trend(data[ratio].to_numpy(float), axes, clusters)
    except ConfigError:
        return None


def trend_markdown(points: pd.DataFrame, cells: pd.DataFrame, ema_decay: float = 0.995) -> str:
    first = math.ceil(math.log(EMA_WARMUP_LEFT) / math.log(ema_decay))
    lines = ["# Crossover trend", "",
             "log(TREAD / baseline held-out loss) = b0 + sum_k b_k log(axis_k), least squares over every (cell, seed "
             f"pair, step) point from step {first} on (before it the EMA, decay {ema_decay}, still holds more than "
             f"{EMA_WARMUP_LEFT:.0%} of the initial weights), errors clustered by seed pair, 95% t intervals on "
             "(seed pairs - 1) degrees of freedom (tread_bench/measure/trend.py), over the cells with at least "
             f"{MIN_PAIRS} seed pairs. At equal FLOPs the baseline's evaluation is an earlier step (where its "
             "training FLOPs equal TREAD's): a point also leaves the fit when that step is inside the warm-up. "
             "A ratio below 1 means TREAD is better.", ""]
    for ratio, title in (("ratio_equal_steps", "At equal steps"), ("ratio_equal_flops", "At equal training FLOPs")):
        lines += [f"## {title}", ""]
        trend = trend_of(points, cells, ratio)
        if trend is None:
            lines += ["Too few seed pairs or axes for a fit.", ""]
            continue
        lines += ["| term | coefficient | 95% interval |", "|---|---|---|"]
        lines += [f"| {t} | {c:.4g} | ± {h:.2g} |" for t, c, h in zip(trend.terms, trend.coef, trend.ci95)]
        lines += ["", f"{trend.points} points from {trend.clusters} seed pairs."]
        missing = [a for a in AXES if a not in trend.terms]
        if missing:  # a prediction along some axes alone would pass for one along all of them
            lines += ["", f"The cells do not vary {', '.join(missing)} yet: no prediction at the paper's DiT-S/2 point "
                      "(33M parameters, 256 tokens, batch 256, 400K steps) until every axis is varied.", ""]
            continue
        mean, lo, hi = trend.predict(PAPER_POINT)
        verdict = ("TREAD better (ratio < 1), as the paper reports" if hi < 0 else
                   "TREAD worse (ratio > 1), against the paper" if lo > 0 else "undecided: the interval spans 1")
        lines += ["", f"Extrapolated to the paper's DiT-S/2 point (33M parameters, 256 tokens, batch 256, 400K steps): "
                  f"ratio {math.exp(mean):.3f} (95% interval of the fitted trend {math.exp(lo):.3f} .. "
                  f"{math.exp(hi):.3f}): {verdict}. The held-out loss alone never decides it: FID must agree "
                  "(the cells table).", ""]
    return "\n".join(lines) + "\n"


def what_it_says(mean: float, half: float, level: float) -> str:
    """What a paired figure says of TREAD, lower being better (a loss ratio around 1, a FID difference around 0):
    better or worse only when its 95% interval leaves ``level``."""
    if not math.isfinite(mean):
        return "not measured"
    if not math.isfinite(half):
        return "one seed pair, no interval"
    return "TREAD better" if mean + half < level else "TREAD worse" if mean - half > level else "undecided"


def verdict_lines(cells: pd.DataFrame) -> list[str]:
    """Per cell, at its last step, at equal steps and at equal training FLOPs: what the loss ratio and the FID
    difference say, and whether they agree. TREAD pays only where both say better: the loss alone never decides."""
    lines = []
    for cell, rows in cells.groupby("cell", sort=False):
        last = rows.loc[rows.step.idxmax()]
        pairs = int(last.seed_pairs)
        parts = []
        for tag, words in (("equal_steps", "at equal steps"), ("equal_flops", "at equal training FLOPs")):
            ratio, ratio_half = last[f"ratio_{tag}"], last[f"ratio_{tag}_ci95"]
            fid, fid_half = last[f"fid_diff_{tag}"], last[f"fid_diff_{tag}_ci95"]
            loss_says, fid_says = what_it_says(ratio, ratio_half, 1.0), what_it_says(fid, fid_half, 0.0)
            if loss_says == fid_says == "TREAD better":
                pays = "TREAD pays"
            elif "TREAD worse" in (loss_says, fid_says):
                pays = "TREAD does not pay"
            elif loss_says == "TREAD better" and fid_says == "not measured":
                pays = "the loss says TREAD pays, unconfirmed: no FID at the baseline's FLOP-matched step"
            elif loss_says == "TREAD better":
                pays = "the loss says TREAD pays, FID does not confirm it"
            else:
                pays = "undecided"
            parts.append(f"{words}, loss ratio {format_ci(ratio, ratio_half)} ({loss_says}), FID difference "
                         f"{format_ci(fid, fid_half)} ({fid_says}): {pays}")
        lines.append(f"- {cell}, step {int(last.step)}, {pairs} seed pair{'' if pairs == 1 else 's'}: "
                     + "; ".join(parts) + ".")
    return lines


def plot_map(cells: pd.DataFrame, path: str | Path) -> Path:
    """The loss ratio at equal steps and at equal training FLOPs and the FID difference at equal steps, at each
    cell's last step against parameters, tokens and tokens per step, and over every cell's evaluation steps; 95%
    intervals over seed pairs as bars, warm-up steps hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = cells.loc[cells.groupby("cell", sort=False).step.idxmax()]
    fig, axes = plt.subplots(3, 4, figsize=(20, 12))
    for row, (metric, ylabel, level) in enumerate((("ratio_equal_steps", "TREAD / baseline loss, equal steps", 1.0),
                                                   ("ratio_equal_flops", "TREAD / baseline loss, equal FLOPs", 1.0),
                                                   ("fid_diff_equal_steps", "FID TREAD - baseline, equal steps", 0.0))):
        for ax, axis, label in zip(axes[row][:3], AXES[:3], ("parameters", "tokens", "tokens per step")):
            for _, r in final.iterrows():
                ax.errorbar([r[axis]], [r[metric]], yerr=[np.nan_to_num(r[f"{metric}_ci95"])], marker="o", capsize=3,
                            label=r.cell)
            ax.axhline(level, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(f"{ylabel}, last step")
            ax.grid(alpha=0.3)
        ax = axes[row][3]
        for cell, c in cells.groupby("cell", sort=False):
            c = c.sort_values("step")
            c = c[np.isfinite(c[metric])]
            if c.empty:
                continue
            line = ax.errorbar(c.step, c[metric], yerr=np.nan_to_num(c[f"{metric}_ci95"]), capsize=3, label=cell)
            warm = c[c[warmup_column(metric)]]
            ax.plot(warm.step, warm[metric], "o", mfc="white", color=line[0].get_color())
        ax.axhline(level, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training steps (hollow: EMA warm-up, not in the trend)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[0][3].legend(fontsize=7)
    fig.suptitle("DiT on Fashion-MNIST 32x32: does TREAD r(2->depth-4)@0.5 pay? Mean over seed pairs, 95% t intervals")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(tables: Sequence[str | Path], out_dir: str | Path | None = None,
                 ema_decay: float = 0.995) -> list[Path]:
    """The cells table, trend and map of the crossover runs tables ``tables``; written to ``out_dir`` (default:
    the first table's folder)."""
    frames = [pd.read_csv(t) for t in tables if Path(t).exists()]
    if not frames:
        raise ConfigError(f"no crossover runs table found among {', '.join(map(str, tables))}; run "
                          "python run_suite.py suite=crossover first")
    runs = pd.concat(frames, ignore_index=True)
    points, cells = pair_points(runs), crossover_cells(runs, ema_decay=ema_decay)
    out = Path(out_dir or Path(tables[0]).parent)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "crossover_cells.csv", out / "crossover_trend.md"]
    cells.to_csv(written[0], index=False)
    if cells.empty:
        written[1].write_text(trend_markdown(points, cells, ema_decay) + "\nNo cell has both methods yet.\n")
        return written
    shown = ("ratio_equal_steps", "ratio_equal_flops", "fid_diff_equal_steps", "fid_diff_equal_flops")
    show = cells.assign(**{c: [format_ci(m, h) for m, h in zip(cells[c], cells[f"{c}_ci95"])] for c in shown})
    show["warm-up"] = ["yes" if both else "equal FLOPs" if flops else ""
                       for both, flops in zip(show.ema_warmup, show.ema_warmup_equal_flops)]
    show["baseline step, equal FLOPs"] = [f"{v:.0f}" if math.isfinite(v) else "–"
                                          for v in show.baseline_step_equal_flops]
    body = (trend_markdown(points, cells, ema_decay) + "## Verdict per cell (loss and FID must agree)\n\n"
            + "\n".join(verdict_lines(cells)) + "\n\n## Cells\n\n"
            + show[["cell", "width", "tokens", "batch", "params", "step", "baseline step, equal FLOPs", "warm-up",
                    "seed_pairs", *shown]]
            .to_markdown(index=False) + "\n")
    written[1].write_text(body)
    written.append(plot_map(cells, out / "crossover_map.png"))
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tables", nargs="+")
    p.add_argument("--out", default=None)
    p.add_argument("--ema-decay", type=float, default=0.995, help="the runs' EMA decay (warm-up steps leave the trend)")
    args = p.parse_args()
    for path in write_report(args.tables, args.out, args.ema_decay):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
