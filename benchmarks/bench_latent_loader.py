"""Latent loader throughput against what DiT-XL/2 consumes on one H100.

Writes N synthetic latents (4x32x32 float16, the SD-VAE latents of 256x256 images) into a temporary folder
as .npy shards, then times random global-batch reads the way the trainer makes them (torch.randint
global indices, ``data.images[idx]`` -> float32): in the training process, and through DataLoader
workers (tread_bench/training/trainer.py's loader path). Prints samples/s and the samples/s DiT-XL/2 needs:

    need = H100 bf16 dense peak x MFU / training FLOPs per image
    training FLOPs per image = 3 (forward + backward) x forward GMACs x 2 FLOPs per MAC

    python benchmarks/bench_latent_loader.py [--num 100000] [--batch 256] [--seconds 5] [--workers 0 2]

The shards were just written, so reads come from the OS page cache (warm); a cold read from disk depends
on the storage (on a network filesystem, put the set on local NVMe or keep it in the page cache).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

H100_BF16_DENSE = 989e12      # FLOP/s, H100 SXM bf16 dense (no sparsity)
MFU = 0.4
DIT_XL2_GMACS = 118.64        # forward MACs per 256x256 image (DiT convention; tread_bench/measure/flops.py, README table)
DIT_XL2_TREAD_GMACS = 69.17   # the same with TREAD r(2->24)@0.5 (README table)


def need(gmacs: float) -> float:
    return H100_BF16_DENSE * MFU / (3 * gmacs * 1e9 * 2)


def time_reads(read, batches, seconds: float):
    """samples/s of ``read(next batch of indices)`` over about ``seconds`` (after one warm-up batch)."""
    it = iter(batches)
    read(next(it))
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += len(read(next(it)))
    return done / (time.perf_counter() - start)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=100_000)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args(argv)

    from torch.utils.data import DataLoader

    from tread_bench.data.latents import BatchRows, BatchSampler, labels_name, load_latents, save_npy, whole_batch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="latents_bench_") as tmp:
        rng, root, shards = np.random.default_rng(0), Path(tmp), []
        t0 = time.perf_counter()
        for s, lo in enumerate(range(0, args.num, args.shard_size)):  # one shard in memory at a time
            n = min(args.shard_size, args.num - lo)
            name = f"latents_{s:05d}.npy"
            save_npy(root / labels_name(name), rng.integers(0, 1000, n))
            save_npy(root / name, rng.standard_normal((n, 4, 32, 32), dtype=np.float32).astype(np.float16))
            shards.append(name)
        (root / "meta.json").write_text(json.dumps({"shape": [4, 32, 32], "scaling_factor": 0.18215,
                                                    "num_classes": 1000, "shards": shards}))
        size = args.num * 4 * 32 * 32 * 2
        print(f"wrote {args.num} latents (4x32x32 float16, {size / 2**20:.0f} MiB, {len(shards)} shards) "
              f"in {time.perf_counter() - t0:.1f} s")
        data = load_latents(tmp, expected_resolution=32)
        g = torch.Generator().manual_seed(0)

        def batches():
            while True:
                yield torch.randint(len(data), (args.batch,), generator=g)

        rates = {}
        for w in args.workers:
            if w == 0:
                rate = time_reads(lambda idx: data.images[idx], batches(), args.seconds)
            else:
                loader = DataLoader(BatchRows(data.images), batch_sampler=BatchSampler(lambda: (b.tolist() for b in batches())),
                                    num_workers=w, collate_fn=whole_batch, prefetch_factor=2,
                                    generator=torch.Generator().manual_seed(0))
                stream = iter(loader)
                rate = time_reads(lambda _: next(stream).float(), batches(), args.seconds)
                del stream
            rates[w] = rate
            print(f"loader, {w} DataLoader worker(s){' (in the training process)' if w == 0 else ''}: "
                  f"{rate:,.0f} samples/s (batch {args.batch}, random global indices)")
    full, tread = need(DIT_XL2_GMACS), need(DIT_XL2_TREAD_GMACS)
    print(f"DiT-XL/2 on one H100 needs {full:,.0f} samples/s = {H100_BF16_DENSE / 1e12:.0f} TFLOP/s bf16 dense x "
          f"MFU {MFU} / (3 x {DIT_XL2_GMACS} GMACs x 2 FLOPs/MAC = {3 * DIT_XL2_GMACS * 2:.1f} GFLOPs per image); "
          f"with TREAD r(2->24)@0.5 ({DIT_XL2_TREAD_GMACS} GMACs): {tread:,.0f} samples/s")
    best = max(rates.values())
    print(f"headroom: the loader reads {best / full:,.0f}x what DiT-XL/2 needs ({best / tread:,.0f}x with TREAD)")


if __name__ == "__main__":
    main()
