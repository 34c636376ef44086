"""Latent encoding round trip on a tiny random AutoencoderKL and a generated image folder; latents read out
of core (every shard format, every way of indexing), the trainer on them, and flat memory as the set grows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tread_bench.core.errors import ConfigError
from tread_bench.data import ImageSet, load_dataset
from tread_bench.data.encode_latents import center_crop, encode_folder
from tread_bench.data.latents import ShardedLatents, load_latents, write_latent_shards

ROOT = Path(__file__).resolve().parents[1]


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
    assert meta["shards"] == ["latents_00000.npy", "latents_00001.npy"] and meta["classes"] == ["cat", "dog"]
    assert np.load(out / "latents_00000.npy", mmap_mode="r").dtype == np.float16
    data = load_dataset("latents", 16, path=str(out))
    assert isinstance(data.images, ShardedLatents) and not data.in_memory
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
    first = (out / "latents_00000.npy").stat().st_mtime_ns
    (out / "latents_00001.npy").unlink()
    encode_folder(str(tmp_path / "images"), str(out), vae=tiny_vae(), resolution=32, batch=4, shard_size=4)
    assert (out / "latents_00000.npy").stat().st_mtime_ns == first
    again = load_dataset("latents", 16, path=str(out))
    assert torch.equal(again.images[:], data.images[:])  # seeded per shard: identical after a rerun
    assert json.loads((out / "meta.json").read_text())["count"] == 6


def random_set(n=50, shape=(4, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)).astype(np.float16), rng.integers(0, 3, n)


def test_npy_shards_read_the_same_rows_and_npz_shards_are_refused_in_one_line(tmp_path):
    x, y = random_set()
    expected = torch.from_numpy(x.astype(np.float32))
    write_latent_shards(tmp_path / "npy", x, y, shard_size=20)
    data = load_latents(str(tmp_path / "npy"), expected_resolution=8)
    assert len(data) == 50 and data.shape == (4, 8, 8) and data.labels.tolist() == y.tolist()
    idx = torch.tensor([49, 0, 21, 21, 39, 40, 5])
    assert torch.equal(data.images[idx], expected[idx])
    assert torch.equal(data.images[np.array([3, 44])], expected[[3, 44]])
    assert torch.equal(data.images[10:45:7], expected[10:45:7]) and torch.equal(data.images[:], expected)
    assert torch.equal(data.images[-1], expected[-1]) and data.images[7].shape == (4, 8, 8)
    assert data.images[idx].dtype == torch.float32
    with pytest.raises(IndexError):
        data.images[torch.tensor([50])]
    folder = tmp_path / "npz"  # an earlier encoder's shards
    folder.mkdir()
    np.savez(folder / "shard_00000.npz", latents=x, labels=y)
    meta = {"shape": [4, 8, 8], "scaling_factor": 0.18215, "num_classes": 3, "shards": ["shard_00000.npz"]}
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as err:
        load_latents(str(folder), expected_resolution=8)
    assert str(err.value) == (f"latent shard {folder / 'shard_00000.npz'} is an .npz, which this version does not "
                              "read; re-encode the folder with python -m tread_bench.data.encode_latents "
                              "(latents_<id>.npy + labels_<id>.npy shards)")
    # limit and head() stay out of core
    head = load_dataset("latents", 8, path=str(tmp_path / "npy"), limit=25)
    assert isinstance(head.images, ShardedLatents) and len(head) == 25 == len(head.images)
    assert torch.equal(head.images[:], expected[:25])


def test_damaged_shards_are_refused_with_the_fix(tmp_path):
    x, y = random_set()
    write_latent_shards(tmp_path, x, y, shard_size=20)
    (tmp_path / "labels_00002.npy").unlink()
    with pytest.raises(ConfigError, match="missing latent shard .*labels_00002.npy"):
        load_latents(str(tmp_path), expected_resolution=8)
    (tmp_path / "latents_00001.npy").write_bytes((tmp_path / "latents_00001.npy").read_bytes()[:500])
    with pytest.raises(ConfigError, match="latents_00001.npy is truncated; re-encode"):
        load_latents(str(tmp_path), expected_resolution=8)


def run_trainer(data, run_dir, steps, workers, resume=False, **cfg):
    from tread_bench.training.trainer import Trainer, TrainConfig
    from suite_helpers import build_denoiser

    torch.manual_seed(0)
    den = build_denoiser("dit", "tiny", data.shape, data.num_classes, routes=[{"start": 1, "end": 3, "rate": 0.5}])
    tr = Trainer(den, data, TrainConfig(steps=steps, global_batch=8, log_every=1, lr=1e-3, loader_workers=workers,
                                        **cfg), run_dir)
    if resume:
        assert tr.try_resume()
    try:
        tr.train()
    except RuntimeError as err:
        assert "loss became nan" in str(err)
    return [s["loss"] for s in tr.stats]


def test_training_on_disk_latents_draws_what_training_in_memory_draws(tmp_path):
    x, y = random_set(60)
    write_latent_shards(tmp_path / "set", x, y, shard_size=25)
    disk = load_latents(str(tmp_path / "set"), expected_resolution=8)
    memory = ImageSet(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y), 3, "memory")
    reference = run_trainer(memory, tmp_path / "memory", 6, workers=0)
    assert run_trainer(disk, tmp_path / "inline", 6, workers=0) == reference
    assert run_trainer(disk, tmp_path / "workers", 6, workers=2) == reference  # DataLoader workers read ahead
    # killed after the step-4 checkpoint, which was written while the loader had drawn steps ahead
    run_trainer(disk, tmp_path / "resumed", 6, workers=2, checkpoint_every=2, fault_nan_at_step=5)
    assert run_trainer(disk, tmp_path / "resumed", 6, workers=1, resume=True) == reference


RSS_SCRIPT = """
import sys, torch
from tread_bench.data import load_dataset
from diffusion import build_objective
from tread_bench.methods import build_network
from tread_bench.training.trainer import Trainer, TrainConfig
data = load_dataset("latents", 32, path=sys.argv[1])
den = build_objective("edm").wrap(build_network("dit", "tiny", data.shape, data.num_classes))
tr = Trainer(den, data, TrainConfig(global_batch=256, loader_workers=0), sys.argv[2])
for _ in range(50):
    x, y, draws = tr._draw_batch()
    assert x.shape == (256, 4, 32, 32)
# peak RSS of this process image: VmHWM (ru_maxrss would carry the parent's peak over fork + exec)
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0])
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_resident_memory_stays_flat_as_the_latent_set_grows(tmp_path):
    """A training process drawing 50 random batches of 256 from 1k vs 10k on-disk latents (4x32x32 float16,
    8 MB vs 82 MB): peak RSS differs by far less than the 74 MB between the sets."""
    rng = np.random.default_rng(0)
    peaks, sizes = [], []
    for n in (1_000, 10_000):
        folder = tmp_path / f"set{n}"
        x = np.empty((n, 4, 32, 32), np.float16)
        for lo in range(0, n, 1000):
            x[lo:lo + 1000] = rng.standard_normal((min(1000, n - lo), 4, 32, 32), dtype=np.float32)
        write_latent_shards(folder, x, rng.integers(0, 10, n), shard_size=2_500)
        sizes.append(x.nbytes)
        del x
        # a fixed glibc mmap threshold: otherwise its dynamic threshold alone moves peak RSS by +-15 MiB between
        # identical runs (measured), which would hide what the data does
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(folder), str(tmp_path / f"run{n}")], cwd=ROOT,
                             env=env, capture_output=True, text=True, check=True)
        peaks.append(int(out.stdout.split()[-1]) * 1024)  # ru_maxrss is in KiB on Linux
    grown, data_grown = peaks[1] - peaks[0], sizes[1] - sizes[0]
    print(f"peak RSS {peaks[0] / 2**20:.1f} MiB (1k) vs {peaks[1] / 2**20:.1f} MiB (10k): "
          f"+{grown / 2**20:.1f} MiB for +{data_grown / 2**20:.1f} MiB of latents")
    assert grown < 0.05 * data_grown  # measured: +0.2 MiB; memory-mapping the shards instead: about +70 MiB


def test_damaged_latent_folders_are_one_line_naming_the_file(tmp_path):
    """meta.json that is not JSON, labels that are pickled or not labels, labels outside num_classes, no folder."""
    import pickle

    from tread_bench.data import load_dataset
    from tread_bench.data.latents import write_latent_shards

    def fresh(name, **kw):
        rng = np.random.default_rng(0)
        folder = tmp_path / name
        write_latent_shards(folder, rng.standard_normal((8, 4, 32, 32)).astype(np.float16), np.arange(8) % 4, 8,
                            num_classes=4, **kw)
        return folder

    def refused(folder):
        with pytest.raises(ConfigError) as err:
            load_dataset("latents", 32, path=str(folder))
        assert "\n" not in str(err.value)
        return str(err.value)

    bad_json = fresh("json")
    (bad_json / "meta.json").write_text('{"shape": [4, 32, 32], ')
    assert refused(bad_json).startswith(f"{bad_json / 'meta.json'} is not JSON (")
    pickled = fresh("pickled")
    (pickled / "labels_00000.npy").write_bytes(pickle.dumps([0, 1, 2]))
    assert refused(pickled).startswith(f"{pickled / 'labels_00000.npy'} is not a plain .npy array of labels (")
    floats = fresh("floats")
    np.save(floats / "labels_00000.npy", np.zeros(8, np.float32))
    assert refused(floats) == (f"{floats / 'labels_00000.npy'} holds float32 (8,), not a 1-D array of integer labels; "
                               "re-encode this shard")
    narrow = fresh("narrow")
    meta = json.loads((narrow / "meta.json").read_text())
    (narrow / "meta.json").write_text(json.dumps({**meta, "num_classes": 3}))
    assert refused(narrow) == (f"labels in {narrow} run from 0 to 3, outside the 3 classes {narrow / 'meta.json'} "
                               "names (0 to 2); fix num_classes in meta.json or re-encode")
    assert refused(tmp_path / "nowhere") == (
        f"missing {tmp_path / 'nowhere' / 'meta.json'}: suite.data.kwargs.path must be a latent folder; make one with "
        "`python -m tread_bench.data.encode_latents --images <image folder> --out <latent folder>`")
