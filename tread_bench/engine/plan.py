"""``plan=true``: what a training suite will cost, printed without training (no run folders, no checkpoints).

For every run of the suite (tread_bench.engine.spec.expand_runs, each network built on the meta device by
tread_bench.engine.spec.build_run_network, as training builds it):

* params: the backbone's parameters (the tables' ``params``).
* training GFLOPs per image: the tables' convention (tread_bench/measure/flops.py, DiT's: 1 multiply-add = 1 FLOP,
  training = 3 x the forward of the network as it trains, so routed for TREAD); the torch counter on the meta
  device, which is instant (the flops suite's fvcore count differs by LayerNorm, < 0.2%).
* total training FLOPs = steps x global batch x training GFLOPs per image (same convention); for a run with a
  schedule (tread_bench/methods/schedule.py), the sum over its stages, and the per-image column is the mean over the run;
  memory is the largest over the stages (a dense fine-tune needs more than the sparse pre-training).
* predicted GPU-hours on each GPU of :data:`GPUS` at model FLOPs utilisation ``plan_mfu``: a GPU executes 2
  FLOPs per multiply-add, so hours = 2 x total (MACs) / (peak FLOP/s x MFU) / 3600. The peaks are the
  vendors' dense bf16 tensor-core figures (SXM parts; no sparsity).
* estimated memory per GPU at the per-GPU batch (global batch / ``plan_gpus``): fp32 weights, gradients, the
  two AdamW moments and the EMA copy (4 + 4 + 8 + 4 bytes per parameter), plus activations from the tokens
  each block sees x its width x a measured bytes-per-token-per-block factor (tread_bench/measure/memory.py says how it was
  measured and what is not counted).

Writes ``results/<suite>_<scale>_plan.csv`` and ``.md``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write
from tread_bench.measure.results import write_markdown
from tread_bench.training.precision import resolve_precision

from .spec import build_run_network, prepare_runs, run_stages

#: dense bf16 tensor-core peak, FLOP/s (no sparsity): H100 SXM 989.4 TFLOP/s, A100 SXM 312 TFLOP/s
GPUS = {"H100": 989e12, "A100": 312e12}

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
    """One run's plan (see the module docstring)."""
    from tread_bench.measure.flops import torch_forward_macs
    from tread_bench.measure.memory import estimate_training_memory
    from tread_bench.methods import cumulative_cost, stage_starts

    train = suite.train
    steps, global_batch = int(train.steps), int(train.global_batch)
    if global_batch % gpus:
        raise ConfigError(f"plan_gpus = {gpus} does not divide suite.train.global_batch = {global_batch}; "
                          f"use a divisor, e.g. plan_gpus=8")
    per_gpu = global_batch // gpus
    precision = resolve_precision(train.get("precision", "auto"), "cuda")  # the plan is for GPUs
    with torch.device("meta"):
        net = build_run_network(run, shape, num_classes)
    params = sum(p.numel() for p in net.parameters())  # with the method's own layers (fusion, decoders)
    stages = run_stages(run)
    stage_macs, memory = [], None
    for i in range(len(stages) + 1):  # a schedule: each stage's network as it trains (Method.apply_settings)
        if i:
            net.apply_settings(**stages[i - 1].settings)
        fwd = torch_forward_macs(net, shape, num_classes)
        if fwd["tokens_per_block"] != net.tokens_per_block():
            raise RuntimeError(f"{type(net).__name__} declares tokens per block {net.tokens_per_block()}, but its "
                               f"blocks received {fwd['tokens_per_block']}; fix its tokens_per_block")
        stage_macs.append(3 * fwd["macs"])
        estimate = estimate_training_memory(net, shape, num_classes, per_gpu, precision, params=params)
        if memory is None or estimate["total"] > memory["total"]:
            memory = estimate  # the stage that needs the most (a dense fine-tune, after a sparse pre-training)
    # total = sum over stages of steps x global batch x training MACs per image; per image: its mean over the run
    total_macs = cumulative_cost(steps, stage_starts(stages), stage_macs, units_per_step=global_batch)
    train_macs = total_macs / (steps * global_batch) if stages else stage_macs[0]
    row = {"suite": run.suite, "scale": run.scale, "run_id": run.run_id, "seed": run.seed, "backbone": run.backbone,
           "size": run.size, "method": run.method, "routes": run.routes_str(), "params": params,
           "train_gflops_per_image": train_macs / 1e9, "steps": steps, "global_batch": global_batch,
           "total_train_flops": total_macs, "mfu": mfu}
    for gpu, peak in GPUS.items():
        row[f"gpu_hours_{gpu}"] = 2 * total_macs / (peak * mfu) / 3600
    gib = 2**30
    row.update(gpus=gpus, batch_per_gpu=per_gpu, precision=precision,
               mem_weights_gib=memory["weights"] / gib, mem_grads_gib=memory["grads"] / gib,
               mem_adamw_gib=memory["adamw"] / gib, mem_ema_gib=memory["ema"] / gib,
               mem_activations_gib=memory["activations"] / gib, mem_total_gib=memory["total"] / gib)
    return row


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
        "routes": table.routes,
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
