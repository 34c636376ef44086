"""Dataset loaders. Each returns an :class:`ImageSet` held in memory (small sets) or read out of core (latents).

- ``synthetic``: procedural class-conditional images (tests; no files needed).
- ``fashion_mnist``: real Fashion-MNIST from the Debian package's IDX files, padded 28 -> 32.
- ``digits``: scikit-learn's bundled 8x8 digits, upsampled to the requested resolution.
- ``latents``: precomputed latent arrays (N, C, H, W) with labels (see tread_bench/data/latents.py).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from tread_bench.core.errors import ConfigError

from .imageset import ImageSet
from .latents import load_latents

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (optionally gzipped) IDX file: magic (3rd byte = number of dims), big-endian int32 dims, uint8 data."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"missing data file {path}; install it with `apt-get install -y dataset-fashion-mnist` "
                          "or set suite.data.kwargs.root to the folder holding the IDX files")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is truncated: header says {tuple(dims)}, found {data.size} values")
    return data.reshape(tuple(int(d) for d in dims))


def _to_unit_range(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8.astype(np.float32) / 127.5 - 1.0)


def load_fashion_mnist(split: str = "train", resolution: int = 32, root: str = FASHION_MNIST_DIR) -> ImageSet:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ConfigError(f"unknown Fashion-MNIST split '{split}'; use train or test")
    images = read_idx(Path(root) / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(Path(root) / f"{prefix}-labels-idx1-ubyte.gz")
    x = _to_unit_range(images)[:, None]  # (N, 1, 28, 28)
    if resolution < 28:
        raise ConfigError(f"Fashion-MNIST resolution must be >= 28, got {resolution}")
    pad = resolution - 28  # pad with background (-1) rather than resample: keeps pixels exact
    x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
    return ImageSet(x.contiguous(), torch.from_numpy(labels.astype(np.int64)), 10, f"fashion_mnist-{split}")


def load_digits(resolution: int = 32) -> ImageSet:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # values 0..16 -> [-1, 1]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(-1, 1)
    return ImageSet(x.contiguous(), torch.from_numpy(d.target.astype(np.int64)), 10, "digits")


def make_synthetic(num: int = 512, resolution: int = 32, channels: int = 1, num_classes: int = 4,
                   seed: int = 0) -> ImageSet:
    """Class-conditional shapes: class k is a blob whose position and orientation depend on k, with
    per-image jitter, so a model has to use the label to denoise well."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (num,), generator=g)
    coords = torch.linspace(-1, 1, resolution)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = labels.float() * (torch.pi / num_classes) + 0.2 * torch.randn(num, generator=g)
    cx = 0.4 * torch.cos(2 * torch.pi * labels.float() / num_classes) + 0.05 * torch.randn(num, generator=g)
    cy = 0.4 * torch.sin(2 * torch.pi * labels.float() / num_classes) + 0.05 * torch.randn(num, generator=g)
    u = (xx[None] - cx[:, None, None]) * torch.cos(angle)[:, None, None] + (yy[None] - cy[:, None, None]) * torch.sin(angle)[:, None, None]
    v = -(xx[None] - cx[:, None, None]) * torch.sin(angle)[:, None, None] + (yy[None] - cy[:, None, None]) * torch.cos(angle)[:, None, None]
    img = torch.exp(-(u / 0.35) ** 2 - (v / 0.12) ** 2) * 2 - 1
    x = img[:, None].expand(num, channels, resolution, resolution).contiguous()
    return ImageSet(x, labels, num_classes, "synthetic")


def load_dataset(name: str, resolution: int = 32, split: str = "train", limit: int | None = None,
                 **kwargs) -> ImageSet:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}'; available: {', '.join(DATASETS)}")
    data = DATASETS[name](resolution=resolution, split=split, **kwargs)
    if limit:
        data = data.head(limit)
    return data


def _latents(resolution: int, split: str = "train", path: str | None = None, **kwargs) -> ImageSet:
    return load_latents(path, expected_resolution=resolution, **kwargs)


DATASETS = {
    "synthetic": lambda resolution, split="train", **kw: make_synthetic(resolution=resolution, seed=0 if split == "train" else 1, **kw),
    "fashion_mnist": lambda resolution, split="train", **kw: load_fashion_mnist(split, resolution, **kw),
    "digits": lambda resolution, split="train", **kw: load_digits(resolution),
    "latents": _latents,
}
