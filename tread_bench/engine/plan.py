"""``plan=true``: what a training suite will cost (tread_bench/measure/cost.py for each run's network, built on the
meta device as training builds it), training and evaluation, printed without training: no run folders, no
checkpoints. Writes ``results/<suite>_<scale>_plan.csv`` and ``.md``, with the throughput sources of the MFU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion import build_objective
from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write
from tread_bench.measure.cost import (GPUS, REFERENCE_WIDTH, evaluation_cost, reference_mfu, throughput_sources,
                                      training_cost)
from tread_bench.measure.evaluate import EvalConfig
from tread_bench.measure.results import write_markdown
from tread_bench.training.precision import resolve_precision

from .spec import build_run_network, prepare_runs, run_stages
from .tables import committed_training_time

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


def plan_row(run, suite: DictConfig, shape, num_classes: int, gpus: int, mfu: Optional[float] = None) -> dict:
    """One run's plan: its identity, tread_bench.measure.cost.training_cost of its network (GPUs: auto = bf16) and
    the cost of its evaluations at the same MFU. ``mfu`` None: from public throughput by the network's width."""
    train = suite.train
    with torch.device("meta"):
        net = build_run_network(run, shape, num_classes)
    steps = train.steps
    cost = training_cost(net, run_stages(run), shape, num_classes, steps, train.global_batch, gpus,
                         resolve_precision(train.get("precision", "auto"), "cuda"), mfu)
    eval_cfg = EvalConfig(**OmegaConf.to_container(suite.get("eval") or {}, resolve=True))
    # latent suites evaluate the held-out loss only with a latent folder of held-out images (engine/lifecycle.py)
    loss = eval_cfg.loss_images > 0 and (suite.data.get("name") != "latents" or bool(eval_cfg.loss_path))
    nfe = build_objective(**run.objective).nfe(eval_cfg.sampler_steps)
    ev = evaluation_cost(net, shape, num_classes, eval_cfg, nfe, steps, cost["mfu"], loss)
    total = {f"total_gpu_hours_{gpu}": cost[f"gpu_hours_{gpu}"] + ev[f"eval_gpu_hours_{gpu}"] for gpu in GPUS}
    return {"suite": run.suite, "scale": run.scale, "run_id": run.run_id, "seed": run.seed, "backbone": run.backbone,
            "size": run.size, "method": run.method, "setting": run.setting, **cost, **ev, **total}


def run_plan(cfg: DictConfig, suite: DictConfig) -> int:
    """Print and write the plan of ``suite`` (any suite with a ``train`` section); trains nothing."""
    if suite.get("train") is None or not suite.get("backbones"):
        raise ConfigError(f"plan=true plans suites that train; suite {suite.name} (kind {suite.get('kind', 'train')}) "
                          "trains nothing")
    mfu = cfg.get("plan_mfu")
    mfu, gpus = (None if mfu is None else float(mfu)), int(cfg.get("plan_gpus", 8))
    shape, num_classes = data_shape(suite)
    runs = prepare_runs(cfg, suite, shape, num_classes, only=True)
    rows = [plan_row(run, suite, shape, num_classes, gpus, mfu) for run in runs]
    table = pd.DataFrame(rows)
    stem = Path(cfg.results_dir) / f"{suite.name}_{cfg.scale.name}_plan"
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(stem.with_suffix(".csv"), lambda tmp: table.to_csv(tmp, index=False))
    notes = plan_notes(mfu, gpus)
    sources = sources_table()
    write_markdown(stem.with_suffix(".md"), display_table(table), f"{suite.name} plan ({cfg.scale.name})",
                   [*notes, "", sources.to_markdown(index=False, floatfmt=".4g"), ""])
    print(f"plan of {suite.name} ({cfg.scale.name}), nothing trained; " + " ".join(notes))
    print(display_table(table).to_string(index=False))
    print("MFU sources:")
    print(sources.drop(columns=["url"]).to_string(index=False))
    for model, url in zip(sources.model, sources.url):
        print(f"  {model}: {url}")
    total = ", ".join(f"{table[f'total_gpu_hours_{gpu}'].sum():,.0f} {gpu} GPU-hours "
                      f"({table[f'gpu_hours_{gpu}'].sum():,.0f} training + {table[f'eval_gpu_hours_{gpu}'].sum():,.0f}"
                      f" evaluation)" for gpu in GPUS)
    print(f"total: {total}; wrote {stem}.csv and .md")
    measured = committed_training_time(suite, cfg.scale.name, runs)
    if measured is not None:
        seconds, device, found = measured
        jobs = suite.get("jobs", 1)
        print(f"on {device}: {seconds / 3600:.1f} h of training for the {found} of these runs the committed reference "
              f"tables hold (their measured training time, evaluation excluded), about {seconds / jobs / 3600:.1f} h "
              f"of wall time at {jobs} at a time")
    return 0


def plan_notes(mfu: Optional[float], gpus: int) -> list[str]:
    if mfu is None:
        source = (f"MFU per run from public training throughput by network width (the sources below: median of the "
                  f"'mfu' rows {reference_mfu():.3f} at DiT-XL's width {REFERENCE_WIDTH}, x the 'width' rows' "
                  "factor for narrower nets; one MFU for every GPU)")
    else:
        source = f"MFU {mfu:g} for every run (plan_mfu; plan_mfu=null takes it from public throughput by width)"
    return [f"GFLOPs in the tables' convention (1 multiply-add = 1 FLOP; training = 3 x forward of the network as it "
            f"trains); GPU-hours = 2 x total / (peak x MFU); {source}; peaks (dense bf16) "
            + ", ".join(f"{g} {p / 1e12:g} TFLOP/s" for g, p in GPUS.items()) + ".",
            "Evaluation per point: FID samples x sampler evaluations x the unrouted forward (x2 with CFG) + the "
            "samples' VAE decode and Inception features (+ held-out loss and sample grid where configured), at the "
            "run's MFU (the decode and Inception run in fp32, so their hours are a lower bound); reference "
            "statistics not counted.",
            f"Memory per GPU at global batch / {gpus} GPUs: fp32 weights + gradients + AdamW (2) + EMA "
            "(20 bytes/param) + activations (tokens x width x a measured bytes-per-token-per-block factor, "
            "tread_bench/measure/memory.py); CUDA context and workspaces not included."]


def sources_table() -> pd.DataFrame:
    """The public throughput figures behind the MFU, one row each (tread_bench/measure/cost.py: THROUGHPUT)."""
    src = pd.DataFrame(list(throughput_sources()))
    return pd.DataFrame({"model": src.model, "width": src.width, "GPU": src.gpu, "precision": src.precision,
                         "img/s per GPU": src.images_per_s.round(1),
                         "train GFLOPs/img": src.train_gflops_per_image.round(1),
                         "MFU": src.mfu.round(3), "use": src.use, "from": src.derived, "url": src.url})


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The printed columns, rounded for reading (the CSV keeps every column at full precision)."""
    out = pd.DataFrame({
        "run": table.run_id + "-seed" + table.seed.astype(str),
        "setting": table.setting,
        "params (M)": (table.params / 1e6).round(1),
        "train GFLOPs/img": table.train_gflops_per_image.round(1),
        "total train FLOPs": table.total_train_flops.map(lambda v: f"{v:.3g}"),
        "MFU": table.mfu.round(3),
        "eval points": table.eval_points,
        "FID FLOPs/point": table.fid_sampling_flops_per_point.map(lambda v: f"{v:.3g}"),
        "decode+Inception FLOPs/point": (table.fid_decode_flops_per_point
                                         + table.fid_inception_flops_per_point).map(lambda v: f"{v:.3g}"),
        "total eval FLOPs": table.total_eval_flops.map(lambda v: f"{v:.3g}"),
    })
    first, *others = GPUS
    out[f"{first}-h train"] = table[f"gpu_hours_{first}"].round(1)
    out[f"{first}-h eval"] = table[f"eval_gpu_hours_{first}"].round(1)
    for gpu in GPUS:
        out[f"{gpu}-h total"] = table[f"total_gpu_hours_{gpu}"].round(1)
    out["batch/GPU"] = table.batch_per_gpu
    out["mem/GPU (GiB)"] = table.mem_total_gib.round(1)
    out["of which act."] = table.mem_activations_gib.round(1)
    return out
