"""The flops kind: forward and training GFLOPs (DiT convention) of every run's network, unrouted and routed, by
both counters, against published figures where the suite lists them (``published``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from omegaconf import DictConfig

from tread_bench.engine.kinds import register_suite_kind
from tread_bench.engine.spec import build_run_network, prepare_runs
from tread_bench.engine.tables import write_table
from tread_bench.measure.flops import flops_row


@dataclass
class FlopsKeys:
    published: Optional[Dict[str, float]] = None   # published GFLOPs per "<backbone>-<size>"


@register_suite_kind("flops", keys=FlopsKeys)
def run_flops_suite(cfg: DictConfig, suite: DictConfig) -> int:
    """results/<suite>.csv: forward/training GFLOPs (DiT convention) unrouted and routed, both counters."""
    d = suite.data
    published = dict(suite.get("published") or {})
    rows = []
    for run in prepare_runs(cfg, suite, (d.channels, d.resolution, d.resolution), d.num_classes):
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
