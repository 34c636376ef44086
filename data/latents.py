"""Precomputed latent arrays: a folder of shards plus ``meta.json``.

Layout (written by ``python -m data.encode_latents`` or by hand)::

    meta.json            {"shape": [4, 32, 32], "scaling_factor": 0.18215, "num_classes": 1000,
                          "shards": ["shard_00000.npz", ...]}
    shard_00000.npz      latents (n, C, H, W) float16/float32 already multiplied by scaling_factor; labels (n,)

The loader checks shape, dtype and scaling at start and fails with one line naming the fix.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from core.errors import ConfigError

SD_VAE_SCALING = 0.18215


def load_latents(path: str | None, expected_resolution: int | None = None, expected_channels: int | None = None,
                 expected_scaling: float | None = SD_VAE_SCALING, limit: int | None = None):
    from .datasets import ImageSet

    if not path:
        raise ConfigError("no latent folder given: set suite.data.kwargs.path (or IMAGENET_LATENTS) to a folder "
                          "with meta.json (see data/latents.py)")
    root = Path(path)
    meta_file = root / "meta.json"
    if not meta_file.exists():
        raise ConfigError(f"missing {meta_file}; encode the images first or fix data.path")
    meta = json.loads(meta_file.read_text())
    shape = tuple(meta.get("shape", ()))
    if len(shape) != 3:
        raise ConfigError(f"{meta_file}: 'shape' must be [C, H, W], got {shape}")
    if expected_resolution is not None and shape[1:] != (expected_resolution, expected_resolution):
        raise ConfigError(f"latents in {root} are {shape[1]}x{shape[2]} but data.resolution is {expected_resolution}; "
                          "set data.resolution to match")
    if expected_channels is not None and shape[0] != expected_channels:
        raise ConfigError(f"latents in {root} have {shape[0]} channels, the model expects {expected_channels} "
                          f"(shape {shape}; an (8, H, W) shape means mean+logvar were stored instead of a sample)")
    scaling = meta.get("scaling_factor")
    if expected_scaling is not None and (scaling is None or abs(scaling - expected_scaling) > 1e-6):
        raise ConfigError(f"latents in {root} were stored with scaling_factor {scaling}, expected {expected_scaling}; "
                          "re-encode or set data.scaling_factor")
    xs, ys, count = [], [], 0
    for name in meta.get("shards", []):
        shard = root / name
        if not shard.exists():
            raise ConfigError(f"missing latent shard {shard}; re-run the encoder (it resumes) or fix data.path")
        with np.load(shard) as z:
            x, y = z["latents"], z["labels"]
        if x.dtype not in (np.float16, np.float32) or tuple(x.shape[1:]) != shape or len(x) != len(y):
            raise ConfigError(f"{shard}: latents {x.dtype} {tuple(x.shape)} do not match meta shape {shape} "
                              f"with {len(y)} labels; re-encode this shard")
        xs.append(torch.from_numpy(x.astype(np.float32)))
        ys.append(torch.from_numpy(y.astype(np.int64)))
        count += len(y)
        if limit and count >= limit:
            break
    if not xs:
        raise ConfigError(f"no shards listed in {meta_file}; the encoding did not finish")
    images, labels = torch.cat(xs)[:limit], torch.cat(ys)[:limit]
    return ImageSet(images, labels, int(meta.get("num_classes", int(labels.max()) + 1)), f"latents:{root.name}")
