"""What training a network will cost, from its shape alone (built on the meta device; nothing trains).

* params: the backbone's parameters (the tables' ``params``).
* training GFLOPs per image: the tables' convention (tread_bench/measure/flops.py, DiT's: 1 multiply-add = 1 FLOP,
  training = 3 x the forward of the network as it trains, so routed for TREAD); the torch counter on the meta
  device, which is instant (the flops suite's fvcore count differs by LayerNorm, < 0.2%).
* total training FLOPs = steps x global batch x training GFLOPs per image (same convention); for a run with a
  schedule (tread_bench/methods/schedule.py), the sum over its stages, and the per-image column is the mean over the run;
  memory is the largest over the stages (a dense fine-tune needs more than the sparse pre-training).
* predicted GPU-hours on each GPU of :data:`GPUS` at model FLOPs utilisation ``mfu``: a GPU executes 2
  FLOPs per multiply-add, so hours = 2 x total (MACs) / (peak FLOP/s x MFU) / 3600. The peaks are the
  vendors' dense bf16 tensor-core figures (SXM parts; no sparsity).
* estimated memory per GPU at the per-GPU batch (global batch / ``gpus``): fp32 weights, gradients, the
  two AdamW moments and the EMA copy (4 + 4 + 8 + 4 bytes per parameter), plus activations from the tokens
  each block sees x its width x a measured bytes-per-token-per-block factor (tread_bench/measure/memory.py says how it was
  measured and what is not counted).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from tread_bench.core.errors import ConfigError
from tread_bench.methods import cumulative_cost, stage_starts

from .flops import torch_forward_macs
from .memory import estimate_training_memory

#: dense bf16 tensor-core peak, FLOP/s (no sparsity): H100 SXM 989.4 TFLOP/s, A100 SXM 312 TFLOP/s
GPUS = {"H100": 989e12, "A100": 312e12}


def training_cost(net: nn.Module, stages: Sequence, data_shape, num_classes: int, steps: int, global_batch: int,
                  gpus: int, precision: str, mfu: float) -> dict:
    """Parameters, training FLOPs, GPU-hours and memory per GPU of training method network ``net`` (meta device)
    for ``steps`` steps of ``global_batch`` over ``gpus`` GPUs at resolved ``precision``; ``stages`` (methods.Stage)
    change its settings as training does. Changes ``net``'s settings."""
    if global_batch % gpus:
        raise ConfigError(f"plan_gpus = {gpus} does not divide suite.train.global_batch = {global_batch}; "
                          f"use a divisor, e.g. plan_gpus=8")
    per_gpu = global_batch // gpus
    params = sum(p.numel() for p in net.parameters())  # with the method's own layers (fusion, decoders)
    stage_macs, memory = [], None
    for i in range(len(stages) + 1):  # a schedule: each stage's network as it trains (Method.apply_settings)
        if i:
            net.apply_settings(**stages[i - 1].settings)
        fwd = torch_forward_macs(net, data_shape, num_classes)
        if fwd["tokens_per_block"] != net.tokens_per_block():
            raise RuntimeError(f"{type(net).__name__} declares tokens per block {net.tokens_per_block()}, but its "
                               f"blocks received {fwd['tokens_per_block']}; fix its tokens_per_block")
        stage_macs.append(3 * fwd["macs"])
        estimate = estimate_training_memory(net, data_shape, num_classes, per_gpu, precision, params=params)
        if memory is None or estimate["total"] > memory["total"]:
            memory = estimate  # the stage that needs the most (a dense fine-tune, after a sparse pre-training)
    # total = sum over stages of steps x global batch x training MACs per image; per image: its mean over the run
    total_macs = cumulative_cost(steps, stage_starts(stages), stage_macs, units_per_step=global_batch)
    train_macs = total_macs / (steps * global_batch) if stages else stage_macs[0]
    row = {"params": params, "train_gflops_per_image": train_macs / 1e9, "steps": steps, "global_batch": global_batch,
           "total_train_flops": total_macs, "mfu": mfu}
    for gpu, peak in GPUS.items():
        row[f"gpu_hours_{gpu}"] = 2 * total_macs / (peak * mfu) / 3600
    gib = 2**30
    row.update(gpus=gpus, batch_per_gpu=per_gpu, precision=precision,
               mem_weights_gib=memory["weights"] / gib, mem_grads_gib=memory["grads"] / gib,
               mem_adamw_gib=memory["adamw"] / gib, mem_ema_gib=memory["ema"] / gib,
               mem_activations_gib=memory["activations"] / gib, mem_total_gib=memory["total"] / gib)
    return row
