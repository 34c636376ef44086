"""Latent encoding round trip on a tiny random AutoencoderKL and a generated image folder."""
import json

import numpy as np
import torch
from PIL import Image

from data import load_dataset
from data.encode_latents import center_crop, encode_folder


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=32)


def make_folder(root, per_class=3):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_center_crop_takes_the_middle():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255  # a white band exactly in the middle 40 columns
    out = center_crop(Image.fromarray(img), 20)
    assert out.shape == (20, 20, 3) and out.min() >= 250


def test_encode_round_trip_and_resume(tmp_path):
    make_folder(tmp_path / "images")
    out = tmp_path / "latents"
    meta = encode_folder(str(tmp_path / "images"), str(out), vae=tiny_vae(), resolution=32, batch=4, shard_size=4)
    assert meta["shape"] == [4, 16, 16] and meta["scaling_factor"] == 0.18215
    assert meta["shards"] == ["shard_00000.npz", "shard_00001.npz"] and meta["classes"] == ["cat", "dog"]
    data = load_dataset("latents", 16, path=str(out))
    assert data.images.shape == (6, 4, 16, 16) and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.num_classes == 2
    # shard 0 = the first 4 images (cat/0..2, dog/0) in one batch: scaling * (mean + std * randn(seed 0))
    with torch.no_grad():
        paths = [tmp_path / "images/cat/0.png", tmp_path / "images/cat/1.png", tmp_path / "images/cat/2.png",
                 tmp_path / "images/dog/0.png"]
        x = torch.stack([torch.from_numpy(center_crop(Image.open(p), 32)).permute(2, 0, 1) for p in paths])
        dist = tiny_vae().encode(x.float() / 127.5 - 1).latent_dist
        noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0))
        expected = ((dist.mean + dist.std * noise) * 0.18215).half().float()
    assert torch.allclose(data.images[:4], expected, atol=1e-3)
    # resume: a finished shard is not recomputed
    first = (out / "shard_00000.npz").stat().st_mtime_ns
    (out / "shard_00001.npz").unlink()
    encode_folder(str(tmp_path / "images"), str(out), vae=tiny_vae(), resolution=32, batch=4, shard_size=4)
    assert (out / "shard_00000.npz").stat().st_mtime_ns == first
    again = load_dataset("latents", 16, path=str(out))
    assert torch.equal(again.images, data.images)  # seeded per shard: identical after a rerun
    assert json.loads((out / "meta.json").read_text())["count"] == 6
