"""What training (and evaluating) a network will cost, from its shape alone (built on the meta device; nothing trains).

* params: the backbone's parameters (the tables' ``params``).
* training GFLOPs per image: the tables' convention (tread_bench/measure/flops.py, DiT's: 1 multiply-add = 1 FLOP,
  training = 3 x the forward of the network as it trains, so routed for TREAD); the torch counter on the meta
  device, which is instant (the flops suite's fvcore count differs by LayerNorm, < 0.2%).
* total training FLOPs = steps x global batch x training GFLOPs per image (same convention); for a run with a
  schedule (tread_bench/methods/schedule.py), the sum over its stages, and the per-image column is the mean over the run;
  memory is the largest over the stages (a dense fine-tune needs more than the sparse pre-training).
* MFU (model FLOPs utilisation): from public training throughput (:data:`THROUGHPUT`, one row per figure) by the
  network's width (:func:`mfu_for_width`), or one given value for every run.
* predicted GPU-hours on each GPU of :data:`GPUS`: a GPU executes 2 FLOPs per multiply-add, so
  hours = 2 x total (MACs) / (peak FLOP/s x MFU) / 3600. The peaks are the vendors' dense bf16 tensor-core
  figures (SXM parts; no sparsity).
* evaluation (:func:`evaluation_cost`): per evaluation point the FID samples' sampler evaluations (x2 with CFG),
  their VAE decode and Inception features, the held-out loss and the sample grid; in total over the points.
* estimated memory per GPU at the per-GPU batch (global batch / ``gpus``): fp32 weights, gradients, the
  two AdamW moments and the EMA copy (4 + 4 + 8 + 4 bytes per parameter), plus activations from the tokens
  each block sees x its width x a measured bytes-per-token-per-block factor (tread_bench/measure/memory.py says how it was
  measured and what is not counted).
"""
from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tread_bench.core.errors import ConfigError
from tread_bench.methods import build_network, cumulative_cost, stage_starts

from .flops import pass_macs, sampling_macs, torch_forward_macs
from .memory import block_shapes, estimate_training_memory

#: dense bf16 (fp16 on the RTX 3090: fp32 accumulate) tensor-core peak FLOP/s, no sparsity: the vendors' sheets
#: (H100/H800 SXM 1,979 and A100 624 TFLOP/s "with sparsity", halved; GA102 whitepaper: RTX 3090 71 TFLOP/s)
PEAKS = {"H100": 989e12, "A100": 312e12, "H800": 989e12, "RTX3090": 71e12}
#: the GPUs a plan prices
GPUS = {gpu: PEAKS[gpu] for gpu in ("H100", "A100")}
#: the width the absolute MFU figures are normalised to: DiT-XL's
REFERENCE_WIDTH = 1152


@dataclass(frozen=True)
class Throughput:
    """One public training-throughput figure. ``use``: "mfu" (its MFU, normalised to :data:`REFERENCE_WIDTH` by the
    width factor, enters the median), "width" (a same-code family across widths: the width factor), or "shown"."""
    model: str
    width: int
    gpu: str
    precision: str
    images_per_s: float  # per GPU
    derived: str         # how images_per_s follows from the source's own numbers
    url: str
    use: str
    network: dict = field(default_factory=dict)  # build_network arguments: the project's FLOP count of the model
    vit: Optional[tuple] = None                   # (depth, width, tokens): a ViT, counted by vit_forward_macs


DIT_XL = dict(backbone="dit", size="XL/2", data_shape=(4, 32, 32), kind="tread", routes=[])
TIMM_CSV = ("https://github.com/huggingface/pytorch-image-models/blob/main/results/"
            "benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv")

#: public training throughput; replace or add a row with a measurement on the target GPU (suite=throughput)
THROUGHPUT = (
    Throughput("fast-DiT DiT-XL/2", 1152, "A100", "fp16 AMP, grad. checkpointing", 0.84 * 128,
               "0.84 steps/s at batch 128 on one A100",
               "https://github.com/chuanyangjin/fast-DiT#improved-training-performance",
               "mfu", DIT_XL),
    Throughput("LightningDiT-XL/1 (VA-VAE f16d32)", 1152, "H800", "bf16", 80_000 * 1024 / (10 * 3600 * 8),
               "64 epochs (its 64-epoch config: 80K steps at batch 1024) in about 10 h on 8 H800",
               "https://github.com/hustvl/LightningDiT#-train-your-own-models",
               "mfu", dict(backbone="lightningdit", size="XL/2", data_shape=(32, 16, 16), kind="tread", routes=[],
                           overrides={"patch_size": 1})),
    Throughput("MaskDiT-XL/2 (mask 0.5, decoder 8x512)", 1152, "A100", "fp16 AMP", 2_000_000 * 1024 / (260 * 3600 * 8),
               "2M steps at batch 1024 in about 260 h on 8 A100", "https://github.com/Anima-Lab/MaskDiT#requirements",
               "mfu", dict(backbone="dit", size="XL/2", data_shape=(4, 32, 32), kind="maskdit", mask_ratio=0.5,
                           decoder_depth=8, decoder_width=512, decoder_heads=16)),
    Throughput("Open-Sora DiT-XL/2", 1152, "H800", "bf16", 1.3 * 128, "1.3 it/s at local batch 128 on 8 H800",
               "https://github.com/hpcaitech/Open-Sora/blob/e3cb99d773c6eade8715f1d02a59c7c8538a2965/docs/speed.md",
               "mfu", DIT_XL),
    Throughput("DiT official train.py DiT-XL/2", 1152, "A100", "tf32 (not mixed)", 0.81 * 256 / 8,
               "0.81 steps/s at batch 256 on 8 A100, TF32 on", "https://github.com/facebookresearch/DiT/issues/22",
               "shown", DIT_XL),
    Throughput("timm vit_small_patch16_224", 384, "RTX3090", "fp16 AMP", 1052.92, "train_samples_per_sec, batch 384",
               TIMM_CSV, "width", vit=(12, 384, 197)),
    Throughput("timm vit_base_patch16_224", 768, "RTX3090", "fp16 AMP", 390.86, "train_samples_per_sec, batch 192",
               TIMM_CSV, "width", vit=(12, 768, 197)),
    Throughput("timm vit_large_patch16_224", 1024, "RTX3090", "fp16 AMP", 117.08, "train_samples_per_sec, batch 64",
               TIMM_CSV, "width", vit=(24, 1024, 197)),
)


def vit_forward_macs(depth: int, width: int, tokens: int, patch: int = 16, channels: int = 3,
                     classes: int = 1000) -> float:
    """Forward MACs of a ViT per image: per block 12 N D^2 (qkv, projection, 4x MLP) + 2 N^2 D (attention), the
    patch embedding and the classifier."""
    blocks = depth * (12 * tokens * width**2 + 2 * tokens**2 * width)
    return float(blocks + (tokens - 1) * patch * patch * channels * width + width * classes)


def train_macs_of(row: Throughput) -> float:
    """Training MACs per image (3 x forward) of a :data:`THROUGHPUT` row's model, by this project's counter (DiT
    family, built on the meta device) or :func:`vit_forward_macs`."""
    if row.vit:
        return 3 * vit_forward_macs(*row.vit)
    spec = dict(row.network)
    backbone, size, shape, kind = spec.pop("backbone"), spec.pop("size"), spec.pop("data_shape"), spec.pop("kind")
    with torch.device("meta"):
        net = build_network(backbone, size, shape, 1000, kind, **spec)
    return 3 * torch_forward_macs(net, shape, 1000)["macs"]


@functools.lru_cache(maxsize=1)
def throughput_sources() -> tuple:
    """Each :data:`THROUGHPUT` row with its training GFLOPs per image (tables' convention) and the MFU it implies:
    images/s x 2 x MACs per image / the GPU's peak."""
    rows = []
    for row in THROUGHPUT:
        if row.gpu not in PEAKS:
            raise ConfigError(f"THROUGHPUT row '{row.model}': unknown GPU {row.gpu}; add its peak to PEAKS")
        macs = train_macs_of(row)
        rows.append({"model": row.model, "width": row.width, "gpu": row.gpu, "precision": row.precision,
                     "images_per_s": row.images_per_s, "train_gflops_per_image": macs / 1e9,
                     "mfu": row.images_per_s * 2 * macs / PEAKS[row.gpu], "use": row.use, "derived": row.derived,
                     "url": row.url})
    return tuple(rows)


def width_factor(width: float) -> float:
    """MFU at ``width`` relative to the widest "width" row's: linear in the width between those rows, held at
    the end values outside them (no evidence that narrower nets fall further, or that wider ones gain)."""
    family = sorted((r["width"], r["mfu"]) for r in throughput_sources() if r["use"] == "width")
    widths, mfus = zip(*family)
    return float(np.interp(width, widths, np.array(mfus) / mfus[-1]))


def reference_mfu() -> float:
    """The median over the "mfu" rows of their MFU scaled to :data:`REFERENCE_WIDTH` (/ their width factor)."""
    rows = [r for r in throughput_sources() if r["use"] == "mfu"]
    return statistics.median(r["mfu"] * width_factor(REFERENCE_WIDTH) / width_factor(r["width"]) for r in rows)


def mfu_for_width(width: float) -> float:
    """The MFU a run of a network of block width ``width`` is planned at: :func:`reference_mfu` x the width factor
    relative to DiT-XL's."""
    return reference_mfu() * width_factor(width) / width_factor(REFERENCE_WIDTH)


def network_width(net: nn.Module, data_shape, num_classes: int) -> int:
    """The width of the first block's input (the backbone's; a method's own blocks, e.g. a decoder, come after)."""
    return block_shapes(net, data_shape, num_classes)[0][1]


def _gpu_hours(macs: float, mfu: float) -> dict:
    return {gpu: 2 * macs / (peak * mfu) / 3600 for gpu, peak in GPUS.items()}


def training_cost(net: nn.Module, stages: Sequence, data_shape, num_classes: int, steps: int, global_batch: int,
                  gpus: int, precision: str, mfu: Optional[float] = None) -> dict:
    """Parameters, training FLOPs, GPU-hours and memory per GPU of training method network ``net`` (meta device)
    for ``steps`` steps of ``global_batch`` over ``gpus`` GPUs at resolved ``precision``; ``stages`` (methods.Stage)
    change its settings as training does. ``mfu`` None: :func:`mfu_for_width` of the net. Changes ``net``'s
    settings."""
    if global_batch % gpus:
        raise ConfigError(f"plan_gpus = {gpus} does not divide suite.train.global_batch = {global_batch}; "
                          f"use a divisor, e.g. plan_gpus=8")
    per_gpu = global_batch // gpus
    params = sum(p.numel() for p in net.parameters())  # with the method's own layers (fusion, decoders)
    width = network_width(net, data_shape, num_classes)
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
    source = "given" if mfu is not None else "public throughput"
    mfu = mfu_for_width(width) if mfu is None else mfu
    row = {"params": params, "width": width, "train_gflops_per_image": train_macs / 1e9, "steps": steps,
           "global_batch": global_batch, "total_train_flops": total_macs, "mfu": mfu, "mfu_source": source}
    for gpu, hours in _gpu_hours(total_macs, mfu).items():
        row[f"gpu_hours_{gpu}"] = hours
    gib = 2**30
    row.update(gpus=gpus, batch_per_gpu=per_gpu, precision=precision,
               mem_weights_gib=memory["weights"] / gib, mem_grads_gib=memory["grads"] / gib,
               mem_adamw_gib=memory["adamw"] / gib, mem_ema_gib=memory["ema"] / gib,
               mem_activations_gib=memory["activations"] / gib, mem_total_gib=memory["total"] / gib)
    return row


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------

def _meta_macs(call, *shape) -> float:
    """MACs (FlopCounterMode FLOPs / 2) of ``call(input)`` on a meta input of ``shape``."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), torch.device("meta"), counter:
        call(torch.zeros(*shape))
    return counter.get_total_flops() / 2


@functools.lru_cache(maxsize=1)
def inception_macs() -> float:
    """MACs of FID's InceptionV3 features of one image at 299 x 299 (torchvision's architecture, on meta)."""
    import torchvision

    with torch.device("meta"):
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
    return _meta_macs(net, 1, 3, 299, 299)


@functools.lru_cache(maxsize=4)
def vae_decode_macs(latent_shape: tuple) -> float:
    """MACs of SD-VAE's decoder on one latent of ``latent_shape`` (C, H, W): the random-weight stand-in of
    tread_bench.measure.evaluate, which has SD-VAE's layers, built on meta (uncached: the real one stays loaded)."""
    from .evaluate import RANDOM_VAE, load_vae

    with torch.device("meta"):
        vae = load_vae.__wrapped__(RANDOM_VAE, "meta")
    return _meta_macs(vae.decode, 1, *latent_shape)


def evaluation_points(steps: int, every: int) -> int:
    """How many times training evaluates: at every multiple of ``every`` before the last step, and at the last."""
    return (steps - 1) // every + 1 if every > 0 else 1


def evaluation_cost(net: nn.Module, data_shape, num_classes: int, eval_cfg, nfe: int, steps: int, mfu: float,
                    held_out_loss: bool) -> dict:
    """The evaluation of one run (tread_bench/engine/lifecycle.py's on_eval) in MACs: per point, the FID samples'
    ``nfe`` sampler evaluations each (x2 with CFG: flops.sampling_macs), their VAE decode (eval_cfg.vae) and
    Inception features; the held-out loss (``held_out_loss``: loss_images x loss_levels passes) and the sample
    grid; in total over the points (FID at every point, or the final one); GPU-hours at ``mfu``."""
    points = evaluation_points(steps, int(eval_cfg.every))
    fid_points = 0 if eval_cfg.samples <= 0 else (points if eval_cfg.fid_at == "every" else 1)
    full = pass_macs(net, data_shape, num_classes)  # unrouted: sampling and the loss run the EMA net in eval mode
    decode = vae_decode_macs(tuple(data_shape)) if eval_cfg.vae else 0.0
    samples = max(int(eval_cfg.samples), 0)
    sampling = samples * nfe * sampling_macs(net, data_shape, num_classes, eval_cfg, full) if samples else 0.0
    fid = {"sampling": sampling, "decode": samples * decode,
           "inception": samples * inception_macs() if samples else 0.0}
    grid = eval_cfg.grid_per_class * min(num_classes, 10) * (nfe * full + decode)  # unguided sampler
    loss = eval_cfg.loss_images * eval_cfg.loss_levels * full if held_out_loss else 0.0
    per_fid_point = sum(fid.values())
    total = fid_points * per_fid_point + points * (grid + loss)
    row = {"eval_points": points, "fid_points": fid_points, "fid_samples": samples, "sampler_nfe": nfe,
           "fid_sampling_flops_per_point": fid["sampling"], "fid_decode_flops_per_point": fid["decode"],
           "fid_inception_flops_per_point": fid["inception"], "eval_flops_per_point": per_fid_point + grid + loss,
           "total_eval_flops": total}
    for gpu, hours in _gpu_hours(total, mfu).items():
        row[f"eval_gpu_hours_{gpu}"] = hours
    return row
