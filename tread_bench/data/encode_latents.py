"""Encode an ImageNet-style folder (one sub-folder per class) into SD-VAE latent shards.

    python -m tread_bench.data.encode_latents --images /data/imagenet/train --out /data/imagenet256_latents \
        [--vae stabilityai/sd-vae-ft-ema] [--resolution 256] [--batch 64] [--shard-size 10000]

Images are center-cropped as in ADM (downsample with BOX while the short side is >= 2x the target,
BICUBIC to the target, then crop the center), encoded with diffusers' AutoencoderKL, and a sample of
the posterior (seeded per shard, so reruns are identical) times the scaling factor is stored as float16,
one ``latents_XXXXX.npy`` + ``labels_XXXXX.npy`` pair per shard (read out of core by tread_bench/data/latents.py).
Resumable: a shard whose files exist is skipped (labels are written first, latents last, each atomically);
meta.json (see tread_bench/data/latents.py) is rewritten atomically after every shard, so a killed run loses at
most the shard it was writing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write, atomic_write_text

from .latents import SD_VAE_SCALING, labels_name, save_npy

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG"}


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop: (size, size, 3) uint8."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def list_images(root: Path):
    """Sorted (path, class index) pairs; classes are the sorted sub-folder names."""
    if not root.is_dir():
        raise ConfigError(f"image folder {root} does not exist; pass --images <folder with one sub-folder per class>")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"{root} has no class sub-folders; expected <root>/<class>/<image>")
    items = [(p, k) for k, c in enumerate(classes) for p in sorted((root / c).rglob("*")) if p.suffix in EXTENSIONS]
    return items, classes


@torch.no_grad()
def encode_folder(images: str, out: str, vae="stabilityai/sd-vae-ft-ema", resolution: int = 256, batch: int = 64,
                  shard_size: int = 10000, device: str | None = None, scaling: float = SD_VAE_SCALING) -> dict:
    from diffusers import AutoencoderKL

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    items, classes = list_images(Path(images))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = vae if isinstance(vae, torch.nn.Module) else AutoencoderKL.from_pretrained(vae)
    model = model.to(device).eval()
    latent_hw = resolution // (2 ** (len(model.config.block_out_channels) - 1))
    meta = {"shape": [model.config.latent_channels, latent_hw, latent_hw], "scaling_factor": scaling,
            "num_classes": len(classes), "classes": classes, "resolution": resolution,
            "vae": vae if isinstance(vae, str) else type(vae).__name__, "shards": [], "count": len(items)}
    num_shards = (len(items) + shard_size - 1) // shard_size
    for s in tqdm(range(num_shards), desc="shards"):
        name = f"latents_{s:05d}.npy"
        chunk = items[s * shard_size:(s + 1) * shard_size]
        if not (out_dir / name).exists():
            g = torch.Generator(device).manual_seed(s)
            lat, lab = [], []
            for b in tqdm(range(0, len(chunk), batch), desc=name, leave=False):
                part = chunk[b:b + batch]
                x = np.stack([center_crop(Image.open(p), resolution) for p, _ in part])
                x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
                dist = model.encode(x).latent_dist
                z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g, device=device)
                lat.append((z * scaling).half().cpu().numpy())
                lab.extend(k for _, k in part)
            latents, labels = np.concatenate(lat), np.asarray(lab, np.int64)
            atomic_write(out_dir / labels_name(name), lambda tmp: save_npy(tmp, labels))
            atomic_write(out_dir / name, lambda tmp: save_npy(tmp, latents))  # last: its presence marks the shard done
        meta["shards"].append(name)
        atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=1))
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="hub id or local folder of an AutoencoderKL")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=10000)
    args = ap.parse_args(argv)
    try:
        meta = encode_folder(args.images, args.out, args.vae, args.resolution, args.batch, args.shard_size)
    except ConfigError as err:
        raise SystemExit(f"error: {err}")
    print(f"wrote {len(meta['shards'])} shards, {meta['count']} latents of shape {meta['shape']} to {args.out}")


if __name__ == "__main__":
    main()
