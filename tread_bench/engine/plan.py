"""``plan=true``: what a training suite will cost (tread_bench/measure/cost.py for each run's network, built on the
meta device as training builds it), printed without training: no run folders, no checkpoints. Writes
``results/<suite>_<scale>_plan.csv`` and ``.md``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write
from tread_bench.measure.cost import GPUS, training_cost
from tread_bench.measure.results import write_markdown
from tread_bench.training.precision import resolve_precision

from .spec import build_run_network, prepare_runs, run_stages

#: data shape (channels, classes) of the built-in datasets, so a plan needs no data on disk
_DATA = {"latents": (4, 1000), "fashion_mnist": (1, 10), "digits": (1, 10), "synthetic": (1, 4)}


def data_shape(suite: DictConfig) -> tuple[tuple[int, int, int], int]:
    """((C, H, W), classes) of the suite's data without reading it (latents: SD-VAE's 4 channels, ImageNet's 1000
    classes); suite.data.channels / num_classes win when set; an unknown dataset is loaded (its first images)."""
    d = suite.data
    res = int(d.resolution)
    channels, classes = _DATA.get(d.get("name"), (None, None))
    channels, classes = d.get("channels") or channels, d.get("num_classes") or classes
    if channels is None or classes is None:
        from tread_bench.data import load_dataset

        images = load_dataset(d.name, res, limit=16, **(d.get("kwargs") or {}))
        return tuple(images.shape), images.num_classes
    return (int(channels), res, res), int(classes)


def plan_row(run, suite: DictConfig, shape, num_classes: int, gpus: int, mfu: float) -> dict:
    """One run's plan: its identity and tread_bench.measure.cost.training_cost of its network (GPUs: auto = bf16)."""
    train = suite.train
    with torch.device("meta"):
        net = build_run_network(run, shape, num_classes)
    cost = training_cost(net, run_stages(run), shape, num_classes, int(train.steps), int(train.global_batch), gpus,
                         resolve_precision(train.get("precision", "auto"), "cuda"), mfu)
    return {"suite": run.suite, "scale": run.scale, "run_id": run.run_id, "seed": run.seed, "backbone": run.backbone,
            "size": run.size, "method": run.method, "setting": run.setting, **cost}


def run_plan(cfg: DictConfig, suite: DictConfig) -> int:
    """Print and write the plan of ``suite`` (any suite with a ``train`` section); trains nothing."""
    if suite.get("train") is None or not suite.get("backbones"):
        raise ConfigError(f"plan=true plans suites that train; suite {suite.name} (kind {suite.get('kind', 'train')}) "
                          "trains nothing")
    mfu, gpus = float(cfg.get("plan_mfu", 0.4)), int(cfg.get("plan_gpus", 8))
    shape, num_classes = data_shape(suite)
    runs = prepare_runs(cfg, suite, shape, num_classes, only=True)
    rows = [plan_row(run, suite, shape, num_classes, gpus, mfu) for run in runs]
    table = pd.DataFrame(rows)
    stem = Path(cfg.results_dir) / f"{suite.name}_{cfg.scale.name}_plan"
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(stem.with_suffix(".csv"), lambda tmp: table.to_csv(tmp, index=False))
    notes = plan_notes(mfu, gpus)
    write_markdown(stem.with_suffix(".md"), _display(table), f"{suite.name} plan ({cfg.scale.name})", notes)
    print(f"plan of {suite.name} ({cfg.scale.name}), nothing trained; " + " ".join(notes))
    print(_display(table).to_string(index=False))
    total = {gpu: table[f"gpu_hours_{gpu}"].sum() for gpu in GPUS}
    print("total: " + ", ".join(f"{hours:,.0f} {gpu} GPU-hours" for gpu, hours in total.items())
          + f"; wrote {stem}.csv and .md")
    return 0


def plan_notes(mfu: float, gpus: int) -> list[str]:
    return [f"GFLOPs in the tables' convention (1 multiply-add = 1 FLOP; training = 3 x forward of the network as it "
            f"trains); GPU-hours = 2 x total / (peak x MFU), MFU {mfu:g}, peaks (dense bf16) "
            + ", ".join(f"{g} {p / 1e12:g} TFLOP/s" for g, p in GPUS.items()) + ".",
            f"Memory per GPU at global batch / {gpus} GPUs: fp32 weights + gradients + AdamW (2) + EMA "
            "(20 bytes/param) + activations (tokens x width x a measured bytes-per-token-per-block factor, "
            "tread_bench/measure/memory.py); CUDA context and workspaces not included."]


def _display(table: pd.DataFrame) -> pd.DataFrame:
    """The printed columns, rounded for reading (the CSV keeps every column at full precision)."""
    out = pd.DataFrame({
        "run": table.run_id + "-seed" + table.seed.astype(str),
        "setting": table.setting,
        "params (M)": (table.params / 1e6).round(1),
        "train GFLOPs/img": table.train_gflops_per_image.round(1),
        "total train FLOPs": table.total_train_flops.map(lambda v: f"{v:.3g}"),
    })
    for gpu in GPUS:
        out[f"{gpu} GPU-h"] = table[f"gpu_hours_{gpu}"].round(0).astype(int)
    out["batch/GPU"] = table.batch_per_gpu
    out["mem/GPU (GiB)"] = table.mem_total_gib.round(1)
    out["of which act."] = table.mem_activations_gib.round(1)
    return out
