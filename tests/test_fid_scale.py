"""FID at scale (tread_bench/measure/evaluate.py FIDEvaluator): per-index noise, streamed features, samples split
between processes and gathered, and peak memory that does not grow with the sample count.

Evaluations in other processes run tests/fid_workers.py (alone, or two gloo processes under torch.distributed.run)
with a deterministic generator or a tiny DiT, and a 48-feature pixel-pooling extractor instead of Inception."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from fid_workers import POOL, SEED, FakeObjective, fake_images, reference_images
from tread_bench.core.errors import ConfigError
from tread_bench.measure import fid
from tread_bench.measure.evaluate import (RANDOM_VAE, DecodedLatents, EvalConfig, FIDEvaluator, decode_latents,
                                          generate, sample_chunks, sample_labels, sample_noise)
from tread_bench.measure.samples import sample_grid

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("fid_workers.py"))


def pool_by_hand(images: torch.Tensor) -> np.ndarray:
    """48 features of [-1, 1] RGB images: uint8 by floor(127.5 x + 128) clipped (in float32, as torch computes it),
    then :func:`pool_uint8_by_hand`."""
    x = images.float().numpy()
    return pool_uint8_by_hand(np.clip(np.floor(x * np.float32(127.5) + np.float32(128)), 0, 255))


def pool_uint8_by_hand(u8) -> np.ndarray:
    """The mean of each of the 4x4 tiles of each channel of (N, 3, H, W) pixel values, scaled by 5/255, in
    channel-major order."""
    u8 = np.asarray(u8, dtype=np.float64)
    n, c, h, w = u8.shape
    return u8.reshape(n, c, 4, h // 4, 4, w // 4).mean(axis=(3, 5)).reshape(n, -1) * (5 / 255)


def fid_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)


def test_noise_and_labels_are_fixed_per_sample_index():
    whole = sample_noise(range(10), (3, 4, 4), SEED)
    assert torch.equal(sample_noise([5, 6, 7], (3, 4, 4), SEED), whole[5:8])  # whatever batch draws them
    assert torch.equal(sample_noise([9, 2], (3, 4, 4), SEED), whole[[9, 2]])
    assert not torch.equal(sample_noise(range(10), (3, 4, 4), SEED + 1), whole)
    assert all(not torch.equal(whole[i], whole[j]) for i in range(10) for j in range(i))
    assert sample_labels(range(8, 13), 10).tolist() == [8, 9, 0, 1, 2]
    assert [list(c) for c in sample_chunks(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ConfigError, match="eval.batch"):
        sample_chunks(10, 0)
    # the same samples in batches of 3 and of 10
    a = generate(torch.nn.Identity(), 10, (3, 4, 4), 10, None, SEED, 3, "cpu", objective=FakeObjective())
    b = generate(torch.nn.Identity(), 10, (3, 4, 4), 10, None, SEED, 10, "cpu", objective=FakeObjective())
    assert torch.equal(a, b)


def test_streamed_metrics_equal_metrics_by_hand(tmp_path):
    """Samples streamed batch by batch (7 at a time, 20 in all) give the FID, KID and precision/recall of the whole
    set computed by hand: pixels, features, statistics and sqrtm written out here."""
    ref_images = reference_images()
    fe = fid.feature_extractor(POOL, ("pool",), None, False)
    ref = fid.reference_statistics(fid.ImageReference("hand-ref", fid.to_uint8(ref_images)), fe, cache_dir=tmp_path)
    evaluator = FIDEvaluator(EvalConfig(samples=20, batch=7, seed=SEED, extractor=POOL), ref["path"], "hand-ref", 10,
                             FakeObjective())
    row = evaluator(torch.nn.Identity(), (3, 16, 16), "cpu")

    images = fake_images(sample_noise(range(20), (3, 16, 16), SEED), torch.arange(20) % 10)
    ours_by_hand, ref_by_hand = pool_by_hand(images), pool_by_hand(ref_images)
    assert row["fid"] > 1 and row["fid_samples"] == 20
    assert row["fid"] == pytest.approx(fid_by_hand(ours_by_hand, ref_by_hand), rel=1e-6)
    kid = kid_features_to_metric(torch.from_numpy(ours_by_hand).float(), torch.from_numpy(ref_by_hand).float(),
                                 kid_subsets=100, kid_subset_size=20, rng_seed=2020, verbose=False)
    assert row["kid"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-4)
    prc = prc_features_to_metric(torch.from_numpy(ours_by_hand).float(), torch.from_numpy(ref_by_hand).float(),
                                 prc_neighborhood=3, verbose=False)
    assert (row["precision"], row["recall"]) == (prc["precision"], prc["recall"])
    assert row["sampler"] == "fake tanh fp32 EMA"  # CPU: fp32, as the precision rule says


def test_latent_samples_are_decoded_batch_by_batch_and_so_is_a_latent_reference():
    """With a VAE (random SD-VAE weights, 4x4x4 latents -> 32x32 images) each batch of samples is decoded before its
    features are taken: the features equal those of all samples decoded at once; a latent reference is read in
    decoded batches, and equals its images decoded one by one."""
    cfg = EvalConfig(samples=6, batch=4, seed=SEED, extractor=POOL, vae=RANDOM_VAE, vae_batch=2, kid=False, prc=False)
    latents = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    evaluator = FIDEvaluator(cfg, latents, "latent-ref", 10, FakeObjective())
    feats = evaluator.sample_features(torch.nn.Identity(), (4, 4, 4), "cpu")
    samples = generate(torch.nn.Identity(), 6, (4, 4, 4), 10, None, SEED, 4, "cpu", objective=FakeObjective())
    by_hand = pool_by_hand(decode_latents(samples, RANDOM_VAE, cfg.latent_scaling, 2, "cpu"))
    np.testing.assert_allclose(feats.numpy(), by_hand, rtol=0, atol=1e-5)

    reference = evaluator.reference.images
    assert isinstance(reference, DecodedLatents) and reference.shape == (5, 3, 32, 32)
    fe = fid.feature_extractor(POOL, ("pool",), None, False)
    streamed = fid.extract_features(reference, fe, batch_size=3)["pool"]
    one_by_one = pool_uint8_by_hand(torch.stack([reference[i] for i in range(5)]).numpy())
    np.testing.assert_allclose(streamed.numpy(), one_by_one, rtol=0, atol=1e-3)  # 1e-3: a pixel one level off


def test_samples_are_made_under_the_precision_rule_and_features_in_fp32():
    """auto on the CPU: fp32, no autocast (CPU results unchanged); bf16 asked for: the network samples under bf16
    autocast, the features are still taken without it, and the row says which precision sampled."""
    from fid_workers import PixelPool

    rows = {}
    for precision in ("auto", "bf16"):
        objective = FakeObjective()
        PixelPool.autocast_seen.clear()
        evaluator = FIDEvaluator(EvalConfig(samples=6, batch=4, extractor=POOL), "unused.npz", "x", 10, objective,
                                 precision=precision)
        evaluator.sample_features(torch.nn.Identity(), (3, 16, 16), "cpu")
        rows[precision] = (objective.autocast_seen, list(PixelPool.autocast_seen))
        assert PixelPool.autocast_seen and not any(PixelPool.autocast_seen)
    assert [on for on, _ in rows["auto"][0]] == [False, False]  # two batches, neither under autocast
    assert rows["bf16"][0] == [(True, torch.bfloat16)] * 2
    evaluator = FIDEvaluator(EvalConfig(samples=6), "unused.npz", "x", 10, FakeObjective())
    metrics = {"num_samples": 6, "reference": "r", "feature_extractor": POOL}
    assert evaluator.row(metrics, "bf16")["sampler"] == "fake tanh bf16 EMA"


def test_sample_grid_keeps_its_noise_and_bad_precision_is_refused():
    """Grids keep drawing their noise from their seed for all labels at once (the images of earlier runs)."""
    images, columns = sample_grid(torch.nn.Identity(), (3, 4, 4), 10, None, 2, 7, "cpu", objective=FakeObjective())
    labels = torch.arange(10).repeat(2)
    noise = torch.randn(20, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    assert columns == 10 and torch.allclose(images, fake_images(noise, labels), atol=1e-6)
    with pytest.raises(ConfigError, match="precision = fp8"):
        FIDEvaluator(EvalConfig(samples=4), "unused.npz", "x", 10, FakeObjective(), precision="fp8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(mode: str, out: Path, count: int, processes: int = 1, **env_vars) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TREAD_FID_CACHE": str(out / "fid-cache"), **env_vars}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if processes > 1 else [sys.executable])
    done = subprocess.run([*launch, WORKER, mode, str(out), str(count)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads((out / "row.json").read_text())
    assert row["num_processes"] == processes
    return row


@pytest.mark.parametrize("mode", ["fake", "dit"])
def test_two_processes_give_the_one_process_fid(tmp_path, mode):
    """20 samples split between 2 gloo processes (fake: batches of 7, so one process repeats the last batch;
    dit: a tiny TREAD DiT under Sparse Guidance, whose forced-rate token draws are per batch) give the same
    features, in the same order, and the same FID, KID and precision/recall as one process."""
    one = run_worker(mode, tmp_path / "one", 20, processes=1)
    two = run_worker(mode, tmp_path / "two", 20, processes=2)
    f1, f2 = np.load(tmp_path / "one" / "features.npy"), np.load(tmp_path / "two" / "features.npy")
    assert f1.shape == f2.shape == (20, 48) and np.array_equal(f1, f2)
    assert one["fid"] > 1 and one["fid_samples"] == two["fid_samples"] == 20
    for key in ("fid", "kid", "precision", "recall"):
        assert two[key] == one[key], key


def test_peak_memory_does_not_grow_with_the_sample_count(tmp_path):
    """Peak RSS of an evaluation of 200 and of 800 3x64x64 samples, each in a fresh process. Holding the samples
    adds 600 x 48 KiB = 28 MiB per float32 copy at 800 (an evaluation holding the noise, the float images and their
    uint8 copies measured +84 MiB here); streaming keeps 48 features per sample. Bound: half of one float32 copy of
    the extra samples.

    Compared: the evaluation's own peak (VmHWM, reset just before it) above the RSS it started from. ru_maxrss is
    printed too but is no measure here: on Linux a process started by a larger one (pytest) keeps the parent's
    peak across exec; it is compared only where /proc is missing. glibc's mmap threshold is fixed for these
    processes: freed large blocks then go back to the system at once, so a peak is the memory live at that moment
    (with the default, rising threshold, heap fragmentation moves it by +-10 MiB from run to run)."""
    rows = {n: run_worker("memory", tmp_path / f"n{n}", n, MALLOC_MMAP_THRESHOLD_="131072") for n in (200, 800)}
    mib = {n: {k: r[k] / 1024 if r[k] is not None else None for k in ("peak_rss_kib", "start_rss_kib", "eval_peak_kib")}
           for n, r in rows.items()}
    for n, m in mib.items():
        print(f"{n} samples: ru_maxrss {m['peak_rss_kib']:.1f} MiB" + (
            f"; evaluation peak {m['eval_peak_kib']:.1f} MiB from {m['start_rss_kib']:.1f} MiB before it "
            f"(+{m['eval_peak_kib'] - m['start_rss_kib']:.1f})" if m["eval_peak_kib"] is not None else ""))
    assert rows[200]["fid_samples"] == 200 and rows[800]["fid_samples"] == 800
    bound = 0.5 * 600 * 3 * 64 * 64 * 4 / 2 ** 20
    if all(m["eval_peak_kib"] is not None for m in mib.values()):
        own = {n: m["eval_peak_kib"] - m["start_rss_kib"] for n, m in mib.items()}
        growth = own[800] - own[200]
    else:
        growth = mib[800]["peak_rss_kib"] - mib[200]["peak_rss_kib"]
    print(f"peak growth from 200 to 800 samples: {growth:+.1f} MiB (bound {bound:.1f} MiB)")
    assert growth < bound
