"""Time Bi-WKV forward+backward at doubling sequence lengths and print the scaling per doubling.

    python benchmarks/bench_scans_rwkv.py --threads 1          # B=4, C=384, T=128..2048 on CPU
    python benchmarks/bench_scans_rwkv.py --device cuda --lengths 256 512 1024 4096

Goal: the O(T) ``bi_wkv`` grows by <= 2.2x per doubling of T. The O(T^2) ``bi_wkv_quadratic``
is timed alongside (up to --quadratic-max) to show what the cumulative-sum form avoids.

Measuring on shared cores: every repeat visits all lengths in turn (round-robin), so a burst of
load from other jobs hits every T alike, and each figure is the best of its repeats (other jobs
only ever add time). On CPU the verdict uses process CPU time (wall time is printed too); on
CUDA it uses synchronised wall time. The "memory baseline" times one exp, multiply and cumsum
over a (B, T, 2C) tensor, forward and backward: an O(T) op with no algorithm in it, so its
factor per doubling shows what the memory hierarchy alone adds once tensors leave the caches.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbones.rwkv import BiWKV, bi_wkv, bi_wkv_quadratic  # noqa: E402

GOAL_PER_DOUBLING = 2.2


def memory_baseline(w, u, k, v):
    """exp, multiply and cumsum over (B, T, 2C): the access pattern of bi_wkv without the formula."""
    x = torch.cat([k, v], dim=-1)
    return torch.cumsum(x.exp() * x, dim=1)[..., : k.shape[-1]]


def make_case(batch, seq, chans, device):
    """Fancy-init decays (layer 0 of 12: -5..3) and random k, v, output gradient for length ``seq``."""
    module = BiWKV(chans, layer_id=0, depth=12).to(device)
    g = torch.Generator().manual_seed(seq)
    k, v, grad = (torch.randn(batch, seq, chans, generator=g).to(device) for _ in range(3))
    return module, k.requires_grad_(), v.requires_grad_(), grad


def run_once(fn, case, device):
    """(wall, process CPU) seconds of one forward+backward."""
    module, k, v, grad = case
    seq = k.shape[1]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    fn(module.decay / seq, module.first / seq, k, v).backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    k.grad = v.grad = module.decay.grad = module.first.grad = None
    return wall, cpu


def best_times(fn, lengths, args, device, repeats, warmup=2):
    """{T: (best wall, best CPU)} with the lengths interleaved in every repeat."""
    cases = {seq: make_case(args.batch, seq, args.channels, device) for seq in lengths}
    best = {seq: (float("inf"), float("inf")) for seq in lengths}
    for i in range(warmup + repeats):
        for seq in lengths:
            wall, cpu = run_once(fn, cases[seq], device)
            if i >= warmup:
                best[seq] = (min(best[seq][0], wall), min(best[seq][1], cpu))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quadratic-max", type=int, default=256, help="longest T for the O(T^2) form")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"Bi-WKV forward+backward, B={args.batch}, C={args.channels}, float32, device={device}, "
          f"threads={torch.get_num_threads()}, best of {args.repeats} (O(T^2): best of 3), lengths interleaved")
    lengths = sorted(args.lengths)
    results = {
        "O(T) bi_wkv": best_times(bi_wkv, lengths, args, device, args.repeats),
        "O(T^2) quadratic": best_times(bi_wkv_quadratic, [t for t in lengths if t <= args.quadratic_max],
                                       args, device, repeats=3, warmup=1),
        "memory baseline": best_times(memory_baseline, lengths, args, device, args.repeats),
    }
    pick = 1 if device.type == "cpu" else 0  # CPU time on CPU, wall time on CUDA
    header = f"{'T':>6}"
    for name in results:
        header += f" | {name + ' wall ms':>26} {'cpu ms':>9} {'x per 2T':>8}"
    print(header)
    worst = 0.0
    for seq in lengths:
        row = f"{seq:>6}"
        for name, times in results.items():
            if seq not in times:
                row += f" | {'-':>26} {'':>9} {'':>8}"
                continue
            factor = ""
            if seq // 2 in times and seq % 2 == 0:
                ratio = times[seq][pick] / times[seq // 2][pick]
                factor = f"{ratio:.2f}x"
                if name.startswith("O(T) "):
                    worst = max(worst, ratio)
            row += f" | {times[seq][0] * 1e3:>26.2f} {times[seq][1] * 1e3:>9.2f} {factor:>8}"
        print(row)
    linear = results["O(T) bi_wkv"]
    if len(lengths) > 1:
        span = math.log2(lengths[-1] / lengths[0])
        mean = (linear[lengths[-1]][pick] / linear[lengths[0]][pick]) ** (1 / span)
        verdict = "meets" if worst <= GOAL_PER_DOUBLING else "MISSES"
        print(f"O(T) factor per doubling ({'CPU' if pick else 'wall'} time): worst {worst:.2f}x, "
              f"geometric mean {mean:.2f}x over T={lengths[0]}..{lengths[-1]} ({verdict} the <= {GOAL_PER_DOUBLING}x goal)")


if __name__ == "__main__":
    main()
