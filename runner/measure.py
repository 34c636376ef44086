"""Measurement kinds: flops and throughput tables, guidance comparison."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from core.io import atomic_write_text
from measure.results import environment, upsert_csv, write_markdown

from .spec import build_run_network, expand_runs, pick_device, validate_run


def run_flops_suite(cfg: DictConfig, suite: DictConfig) -> int:
    """results/<suite>.csv: forward/training GFLOPs (DiT convention) unrouted and routed, both counters."""
    import torch

    from measure.flops import flops_row

    d = suite.data
    published = dict(suite.get("published") or {})
    rows = []
    for run in expand_runs(suite, cfg.scale):
        with torch.device("meta"):
            net = build_run_network(run, (d.channels, d.resolution, d.resolution), d.num_classes)
        row = {"backbone": run.backbone, "size": run.size,
               **flops_row(net, input_size=d.resolution, in_channels=d.channels, num_classes=d.num_classes)}
        ref = published.get(f"{run.backbone}-{run.size}")
        row.update(suite=suite.name, scale=cfg.scale.name, method=run.method, published_gflops=ref,
                   published_rel_err=(row["gflops_fwd"] - ref) / ref if ref else None)
        print(f"{run.backbone} {run.size} {run.method}: {row['gflops_fwd']:.2f} -> {row['gflops_fwd_routed']:.2f} "
              f"GFLOPs (x{row['ratio']:.2f}; counters differ by {100 * row['counter_rel_diff']:.2f}%)")
        rows.append(row)
    baseline = {(r["backbone"], r["size"]): r["gflops_train"] for r in rows if r["method"] == "baseline"}
    for row in rows:  # with a method named baseline: its training FLOPs per image / the method's (a speedup)
        base = baseline.get((row["backbone"], row["size"]))
        row["flop_ratio_vs_baseline"] = base / row["gflops_train"] if base else None
    return write_table(cfg, suite, rows, ["suite", "scale", "backbone", "size", "method"],
                        ["FLOPs: " + rows[0]["convention"] if rows else "",
                         "A scheduled method (suite entry `schedule`) is counted at its entry's own settings."])


def run_throughput_suite(cfg: DictConfig, suite: DictConfig) -> int:
    """results/<suite>.csv: interleaved training-step timing of every method per backbone."""
    from measure.throughput import cpu_peak_rss_mb, forward_macs, make_train_step, measure_interleaved

    device = pick_device(cfg.device)
    precision = suite.precision if suite.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    cpu_rss = device == "cpu" and suite.get("cpu_peak_rss", True)
    memory_kind = "cuda max allocated" if device == "cuda" else ("process peak RSS" if cpu_rss else "not measured")
    d = suite.data
    shape = (d.channels, d.resolution, d.resolution)
    runs = expand_runs(suite, cfg.scale)
    for run in runs:  # validate every run before anything is timed
        validate_run(run, shape, d.num_classes)
    rows = []
    for backbone, size in dict.fromkeys((r.backbone, r.size) for r in runs):
        group = {r.method: r for r in runs if (r.backbone, r.size) == (backbone, size)}
        specs = {m: dict(backbone=backbone, size=size, kind=r.kind, method_args=r.method_args(), data_shape=shape,
                         num_classes=d.num_classes, batch=suite.batch, overrides=r.overrides, objective=r.objective)
                 for m, r in group.items()}
        steps = {m: make_train_step(spec, device, precision) for m, spec in specs.items()}
        timing = measure_interleaved(steps, suite.warmup, suite.rounds, device)
        macs = {m: forward_macs(spec) for m, spec in specs.items()}
        base = suite.baseline
        for m, t in timing.items():
            predicted = macs[base] / macs[m]
            measured = timing[base]["p50_s"] / t["p50_s"]
            peak = cpu_peak_rss_mb(specs[m], precision) if cpu_rss else t["peak_mem_mb"]
            rows.append({"suite": suite.name, "scale": cfg.scale.name, "backbone": backbone, "size": size,
                         "method": m, "routes": group[m].routes_str(), "batch": suite.batch, "precision": precision,
                         "steps_measured": t["n"], "warmup_steps": suite.warmup, "mean_ms": 1e3 * t["mean_s"],
                         "p50_ms": 1e3 * t["p50_s"], "p90_ms": 1e3 * t["p90_s"],
                         "samples_per_s": suite.batch / t["mean_s"], "peak_mem_mb": peak,
                         "peak_mem_kind": memory_kind, "measured_speedup": measured, "predicted_speedup": predicted,
                         "measured_over_predicted": measured / predicted, **environment(device)})
            print(f"{backbone} {size} {m}: p50 {1e3 * t['p50_s']:.1f} ms, speedup {measured:.3f} "
                  f"(FLOPs predict {predicted:.3f})")
    return write_table(cfg, suite, rows, ["suite", "scale", "backbone", "size", "method"],
                       ["Interleaved A B A B after warm-up; speedup = baseline p50 / method p50; predicted = "
                        "training-MAC ratio."])


def write_table(cfg, suite, rows, key, notes) -> int:
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = suite.get("results_file") or f"{suite.name}.csv"
    table = upsert_csv(out / name, rows, key)
    write_markdown(out / name.replace(".csv", ".md"), pd.DataFrame(rows), f"{suite.name} ({cfg.scale.name})",
                   [n for n in notes if n] + [f"Measured on {environment().get('device')}."])
    atomic_write_text(out / f"{suite.name}_{cfg.scale.name}_config.yaml", OmegaConf.to_yaml(suite))
    print(f"wrote {out / name} ({len(rows)} rows of {len(table)})")
    return 0


