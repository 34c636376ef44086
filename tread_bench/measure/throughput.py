"""Training throughput, measured the way benchmark suites agree on (timm, optimum-benchmark, EDM2).

Protocol: every configuration gets its warm-up steps (not measured); then measured steps run interleaved,
A B A B ..., so slow drift of the machine (thermal, other load) hits all configurations alike. One step is the
training loop's own step (tread_bench.training.trainer.Trainer.train_step: the batch's draws, the objective's
loss, backward, AdamW, EMA) over random images.
Reported per configuration: mean, p50 and p90 step time, samples/s (batch / mean step time), and on CUDA the
peak allocated memory (on CPU tread_bench.measure.memory measures each configuration in a process of its own,
since RSS cannot be split between interleaved configurations in one process).
The measured speedup is baseline p50 / method p50 (the median resists outlier steps); the predicted one is the
ratio of training MACs from tread_bench/measure/flops.py.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

from tread_bench.data import ImageSet
from tread_bench.training.precision import set_tf32
from tread_bench.training.trainer import Trainer, TrainConfig, build_accelerator


def make_train_step(objective, model, data_shape, num_classes: int, batch: int, device: str, precision: str,
                    seed: int = 0, compiled: bool = False, tf32: bool = True) -> Callable[[], torch.Tensor]:
    """The training loop's step on ``model`` (``objective.wrap(method network)``) at ``batch`` random images of
    ``data_shape``, on ``device`` at ``precision`` (the training rule's names: auto, fp32, bf16, fp16), its blocks
    compiled or eager, TF32 on or off (CUDA; set before each step, since interleaved configurations share it). The step
returns its loss on the device (reading it would sync)."""
    g = torch.Generator().manual_seed(seed)
    data = ImageSet(torch.randn(batch, *data_shape, generator=g), torch.randint(num_classes, (batch,), generator=g),
                    num_classes, "random")
    cfg = TrainConfig(global_batch=batch, precision=precision, seed=seed, loader_workers=0, compile_blocks=compiled,
                      tf32=tf32)
    # only train_step is called: the run folder is never written
    trainer = Trainer(model, data, cfg, Path(tempfile.gettempdir()) / "tread-bench-timing",
                      accelerator=build_accelerator(precision, device), objective=objective)

    def step() -> torch.Tensor:
        set_tf32(tf32, device)
        return trainer.train_step()

    return step


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_interleaved(steps: Dict[str, Callable[[], None]], warmup: int, rounds: int,
                        device: str = "cpu") -> Dict[str, dict]:
    """Warm each configuration up, then time ``rounds`` interleaved passes over all of them."""
    cuda = torch.device(device).type == "cuda"
    times: Dict[str, List[float]] = {name: [] for name in steps}
    peak: Dict[str, int] = {name: 0 for name in steps}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
    _sync(device)
    for _ in range(rounds):
        for name, step in steps.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    out = {}
    for name, ts in times.items():
        arr = np.asarray(ts)
        out[name] = {"mean_s": arr.mean(), "p50_s": float(np.percentile(arr, 50)),
                     "p90_s": float(np.percentile(arr, 90)), "n": len(arr),
                     "peak_mem_mb": peak[name] / 2**20 if cuda else float("nan")}
    return out
