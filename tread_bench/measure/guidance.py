"""The guidance study's analysis: per (method, sampling mode), FID and KID over training seeds, the paired
difference from the same model sampled unguided, and the sampling cost; a figure of FID against sampling GFLOPs
per image, and the sample grids side by side.

    python -m tread_bench.measure.guidance results/guidance.csv   # the summary and figures again from a table
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from .stats import format_ci, summarise

GROUP = ["backbone", "size", "method", "mode"]


def mode_label(row) -> str:
    """What a mode does, from its settings: 'unguided', 'CFG 1.5', 'PDG 1.5', 'SG 0.25/0.75 x1.5'."""
    def num(v):
        return f"{float(v):g}"

    if _set(row.get("strong_rate")):
        return f"SG {num(row['strong_rate'])}/{num(row['weak_rate'])} x{num(row['sg_scale'])}"
    if _set(row.get("cfg_scale")) and float(row["cfg_scale"]) != 1.0:
        if _set(row.get("uncond_rate")):
            return (f"PDG {num(row['cfg_scale'])}" if float(row["uncond_rate"]) == 1.0
                    else f"CFG {num(row['cfg_scale'])}, uncond rate {num(row['uncond_rate'])}")
        return f"CFG {num(row['cfg_scale'])}"
    return "unguided"


def _set(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (backbone, size, method, mode), in the table's order: seeds, the mode's label, FID and KID
    (mean and 95% t half-width over training seeds), FID minus the same seed's unguided FID (paired), network
    evaluations, GFLOPs per image and the cost relative to one unguided evaluation."""
    ok = table[table.fid.notna()]
    unguided = ok[ok["mode"] == "unguided"].set_index(["backbone", "size", "method", "seed"]).fid
    rows = []
    for key, g in ok.groupby(GROUP, sort=False):
        first = g.iloc[0].to_dict()
        row = dict(zip(GROUP, key))
        row["label"] = mode_label(first)
        row["seeds"] = int(g.seed.nunique())
        row.update(summarise("fid", g.fid))
        if "kid" in g and g.kid.notna().any():
            row.update(summarise("kid", g.kid))
        paired = [f - unguided.get((*key[:3], s), math.nan) for f, s in zip(g.fid, g.seed)]
        row.update(summarise("fid_vs_unguided", paired) if key[3] != "unguided" else
                   {"fid_vs_unguided": 0.0, "fid_vs_unguided_ci95": math.nan, "fid_vs_unguided_n": len(g)})
        row.update(nfe=int(first["nfe"]), sampling_gflops_per_image=float(g.sampling_gflops_per_image.mean()),
                   cost_vs_unguided=float(g.cost_vs_unguided.mean()))
        if "sampling_s" in g:
            row["sampling_s"] = float(g.sampling_s.mean())
        rows.append(row)
    return pd.DataFrame(rows)


def summary_markdown(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as it reads in Markdown: one 'mean ± half-width' cell per figure."""
    out = pd.DataFrame({
        "model": summary.backbone + "-" + summary["size"] + " " + summary.method,
        "mode": summary["mode"], "setting": summary.label, "seeds": summary.seeds,
        "FID": [format_ci(m, h, 4) for m, h in zip(summary.fid, summary.fid_ci95)],
        "FID vs unguided": [format_ci(m, h, 3) for m, h in zip(summary.fid_vs_unguided, summary.fid_vs_unguided_ci95)],
    })
    if "kid" in summary:
        out["KID"] = [format_ci(m, h, 3) for m, h in zip(summary.kid, summary.kid_ci95)]
    out["NFE"] = summary.nfe
    out["GFLOPs/image"] = summary.sampling_gflops_per_image.map(lambda v: f"{v:.3g}")
    out["cost / unguided"] = summary.cost_vs_unguided.map(lambda v: f"{v:.3f}")
    return out


def plot_guidance(summary: pd.DataFrame, path: str) -> str | None:
    """FID against sampling GFLOPs per image, a panel per model (shared FID axis): one marker per mode, the 95%
    interval over training seeds as a bar (none with one seed)."""
    if summary.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"unguided": "o", "CFG": "s", "PDG": "D", "SG": "^"}
    models = list(summary.groupby(["backbone", "size", "method"], sort=False))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), sharey=True, squeeze=False)
    for k, (ax, (model, g)) in enumerate(zip(axes[0], models)):
        for _, r in g.iterrows():
            family = r.label.split(" ")[0]
            err = r.fid_ci95 if math.isfinite(r.fid_ci95) else None
            ax.errorbar(r.sampling_gflops_per_image, r.fid, yerr=err, fmt=markers.get(family, "x"),
                        color=f"C{list(markers).index(family) if family in markers else 4}", capsize=3)
            ax.annotate(r.label, (r.sampling_gflops_per_image, r.fid), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_title(f"{model[0]}-{model[1]} {model[2]}", fontsize=10)
        ax.set_xlabel("sampling GFLOPs per image")
        ax.grid(alpha=0.3)
    for family, m in markers.items():
        axes[0][0].plot([], [], m, color=f"C{list(markers).index(family)}", label=family)
    seeds = int(summary.seeds.max())
    axes[0][0].set_ylabel(f"FID (mean, 95% t interval, {seeds} training seeds)" if seeds > 1 else "FID (one seed)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Guidance rules: FID against sampling cost (network evaluations x MACs per evaluation)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def sample_panel(table: pd.DataFrame, path: str) -> str | None:
    """The sample grids of the lowest training seed side by side: a column per model, a row per mode (the same
    noise and labels in every grid). Grids whose files are gone (run folders of another machine) are skipped."""
    if "grid" not in table:
        return None
    seed = table.seed.min()
    rows = table[(table.seed == seed) & table.grid.map(lambda p: isinstance(p, str) and Path(p).exists())]
    if rows.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(rows.method))
    modes = list(dict.fromkeys(rows["mode"]))
    fig, axes = plt.subplots(len(modes), len(models), figsize=(4.2 * len(models), 1.3 * len(modes) + 0.5),
                             squeeze=False)
    for i, mode in enumerate(modes):
        for j, method in enumerate(models):
            ax = axes[i][j]
            ax.axis("off")
            hit = rows[(rows.method == method) & (rows["mode"] == mode)]
            if hit.empty:
                continue
            ax.imshow(mpimg.imread(hit.grid.iloc[0]), cmap="gray")
            ax.set_title(f"{method}: {mode_label(hit.iloc[0].to_dict())}", fontsize=8)
    fig.suptitle(f"samples, training seed {seed}: same noise and labels in every grid", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(table: pd.DataFrame, out_dir: Path, suite: str, scale: str) -> list:
    """The summary (CSV upserted by scale, Markdown), the FID-cost figure and the sample panel of one suite and
    scale's rows of the guidance table; returns the paths written."""
    from .results import upsert_csv, write_markdown

    out_dir = Path(out_dir)
    summary = summary_table(table)
    stem = out_dir / f"{suite}_summary"
    upsert_csv(f"{stem}.csv", [{"scale": scale, **r} for r in summary.to_dict("records")],
               ["scale", "backbone", "size", "method", "mode"])
    write_markdown(f"{stem}.md", summary_markdown(summary), f"{suite} ({scale})",
                   [f"Device: {table.device.iloc[0]}; training seeds {', '.join(map(str, sorted(table.seed.unique())))}"
                    f"; {int(table.fid_samples.iloc[0])} samples per FID, the same sampler noise for every mode.",
                    "Mean over training seeds with the half-width of a two-sided 95% Student-t interval (n-1 "
                    "degrees of freedom); 'FID vs unguided': the paired difference from the same model sampled "
                    "unguided, seed by seed.",
                    "GFLOPs per image: network evaluations x MACs of the passes of one evaluation (DiT's MAC "
                    "convention, counted by torch's flop counter at each forced rate)."])
    paths = [Path(f"{stem}.csv"), Path(f"{stem}.md")]
    for path in (plot_guidance(summary, str(out_dir / f"{suite}_{scale}.png")),
                 sample_panel(table, str(out_dir / f"{suite}_{scale}_samples.png"))):
        if path:
            paths.append(Path(path))
    return paths


def main(argv=None) -> None:
    from .results import read_table

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m tread_bench.measure.guidance results/guidance.csv")
    table = read_table(Path(args[0]), ["suite", "scale", "method", "seed", "mode"])
    if table is None:
        raise SystemExit(f"no table at {args[0]}")
    for (suite, scale), part in table.groupby(["suite", "scale"]):
        for path in write_summary(part, Path(args[0]).parent, suite, scale):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
