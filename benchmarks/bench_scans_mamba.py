"""CPU timings of our Mamba scan (backbones/mamba.py): the fused CPU kernel (backbones/mamba_cpu.py,
the default where it builds) or, with --scan pure, the pure-PyTorch scan.

(a) scaling: forward+backward of the selective scan at L, 2L, 4L (B=4, D_inner=768, N=16); the
    factor per doubling should stay near 2 (goal <= 2.2x: linear in L).
(b) ours vs PyPI mambapy's parallel (Blelloch) scan, B=4, L=256, d_model=384: the selective scan
    alone (same inputs, same math around each scan) and the whole mixer (same state dict),
    forward+backward, repetitions interleaved so that load on a shared CPU hits both alike.

(k) the fused kernel's forward and backward calls alone at L, 2L, 4L (what (a) times minus the
    elementwise PyTorch ops around them).

    python benchmarks/bench_scans_mamba.py [--threads N] [--reps 5] [--part a|b|k|both] [--scan kernel|pure]

On a shared, oversubscribed CPU, OpenMP threads that spin-wait for a descheduled peer make every
small op slow; the many-op chunked scan suffers more than mambapy's few large ops. Measure there
with --threads 1 or OMP_WAIT_POLICY=PASSIVE (the header prints the policy and the load average).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbones import mamba_cpu  # noqa: E402
from backbones.mamba import MambaMixer, selective_scan  # noqa: E402


def scan_inputs(batch, channels, states, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    A = -torch.arange(1, states + 1.0).repeat(channels, 1)  # mamba's init A = -(1..N)
    tensors = [r(batch, channels, length), r(batch, channels, length) - 4.0, A, r(batch, states, length),
               r(batch, states, length), torch.ones(channels), r(batch, channels, length), r(channels)]
    return [t.requires_grad_() for t in tensors]


CPU_KERNEL = True  # --scan: the fused CPU scan (True) or the pure-PyTorch one


def ours_scan(u, delta, A, B, C, D, z, bias):
    return selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, cpu_kernel=CPU_KERNEL)


def mambapy_scan(u, delta, A, B, C, D, z, bias):
    """mambapy's selective scan (MambaBlock.selective_scan around mambapy.pscan) with the same
    softplus / D / silu(z) gating, in mamba_ssm's (B, D, L) layout."""
    from mambapy.pscan import pscan

    dt = F.softplus(delta + bias[:, None]).transpose(1, 2)  # (B, L, D)
    x = u.transpose(1, 2)
    states = pscan(torch.exp(dt.unsqueeze(-1) * A), (dt * x).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2))
    y = (states @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3)
    return ((y + D * x) * F.silu(z.transpose(1, 2))).transpose(1, 2)


def fwd_bwd_seconds(fn, inputs):
    """(wall, process CPU) seconds of one forward+backward. On a shared machine the CPU time is the
    steadier figure: it leaves out the time this process waited for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*inputs)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(named_fns, reps):
    """{name: [(wall, cpu) seconds per rep]}; one warm-up call each, then the functions alternate."""
    for fn, inputs in named_fns.values():
        fwd_bwd_seconds(fn, inputs)
    times = {name: [] for name in named_fns}
    for _ in range(reps):
        for name, (fn, inputs) in named_fns.items():
            times[name].append(fwd_bwd_seconds(fn, inputs))
    return times


def median(runs, which):
    return statistics.median(r[which] for r in runs)


def fmt(runs):
    return (f"wall median {median(runs, 0):.3f}s (min {min(r[0] for r in runs):.3f}s), "
            f"CPU median {median(runs, 1):.3f}s (min {min(r[1] for r in runs):.3f}s), n={len(runs)}")


def ratio(slow, fast):
    best = lambda runs, which: min(r[which] for r in runs)  # noqa: E731
    return (f"wall {median(slow, 0) / median(fast, 0):.2f}x, CPU {median(slow, 1) / median(fast, 1):.2f}x "
            f"(of the minima: wall {best(slow, 0) / best(fast, 0):.2f}x, CPU {best(slow, 1) / best(fast, 1):.2f}x)")


def scaling(reps, lengths=(256, 512, 1024), batch=4, d_model=384):
    print(f"(a) selective scan forward+backward, B={batch}, D_inner={2 * d_model}, N=16 (lengths interleaved)")
    runs = {length: (ours_scan, scan_inputs(batch, 2 * d_model, 16, length)) for length in lengths}
    times = interleaved(runs, reps)
    for length in lengths:
        print(f"    L={length:5d}: {fmt(times[length])}")
    for l0, l1 in zip(lengths, lengths[1:]):
        print(f"    L {l0} -> {l1}: per doubling {ratio(times[l1], times[l0])} (goal <= 2.2)")


def kernel_alone(reps, lengths=(256, 512, 1024), batch=4, d_model=384, states=16):
    """The C++ forward and backward calls only, without the elementwise PyTorch ops around them."""
    lib = mamba_cpu.load()
    if lib is None:
        print("(k) skipped: the fused CPU scan did not build")
        return
    channels = 2 * d_model
    print(f"(k) the fused kernel's calls alone, B={batch}, D_inner={channels}, N={states}, 1 call = forward or backward")
    g = torch.Generator().manual_seed(0)
    times = {}
    for length in lengths:
        r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
        dt, dtu, B, C, grad_y = (r(batch, length, channels).abs() * 0.1, r(batch, length, channels),
                                 r(batch, length, states), r(batch, length, states), r(batch, length, channels))
        At = -torch.arange(1, states + 1.0)[:, None].repeat(1, channels)
        outs = [torch.empty_like(dt) for _ in range(3)] + [torch.empty_like(B), torch.empty_like(C),
                                                           dt.new_empty(batch, states, channels)]
        shapes = [length, batch, channels, states, channels, length * channels, states, length * states]
        ptrs = [t.data_ptr() for t in (dt, dtu, B, C, At)]
        threads = torch.get_num_threads()
        calls = {"forward": lambda: lib.scan_forward_f32(*shapes, *ptrs, outs[0].data_ptr(), threads),
                 "backward": lambda: lib.scan_backward_f32(*shapes, *ptrs, grad_y.data_ptr(),
                                                           *[t.data_ptr() for t in outs[1:]], threads)}
        for name, call in calls.items():
            call()
            runs = []
            for _ in range(reps):
                wall = time.perf_counter()
                call()
                runs.append(time.perf_counter() - wall)
            times[(length, name)] = statistics.median(runs)
            print(f"    L={length:5d} {name:8s}: wall median {times[(length, name)] * 1e3:.2f} ms, n={reps}")
    for l0, l1 in zip(lengths, lengths[1:]):
        print(f"    L {l0} -> {l1}: per doubling forward {times[(l1, 'forward')] / times[(l0, 'forward')]:.2f}x, "
              f"backward {times[(l1, 'backward')] / times[(l0, 'backward')]:.2f}x")


def versus_mambapy(reps, batch=4, length=256, d_model=384):
    try:
        from mambapy.mamba import MambaBlock, MambaConfig
    except ImportError:
        print("(b) skipped: mambapy is not installed (pip install mambapy)")
        return
    print(f"(b) ours vs mambapy.pscan, B={batch}, L={length}, d_model={d_model} (D_inner={2 * d_model}, N=16), "
          "forward+backward, interleaved")
    inputs = scan_inputs(batch, 2 * d_model, 16, length, seed=1)
    with torch.no_grad():
        diff = (ours_scan(*inputs) - mambapy_scan(*inputs)).abs().max().item()
    times = interleaved({"ours": (ours_scan, inputs), "mambapy": (mambapy_scan, inputs)}, reps)
    print(f"    selective scan  ours:    {fmt(times['ours'])}")
    print(f"    selective scan  mambapy: {fmt(times['mambapy'])}   (max |out diff| {diff:.1e})")
    print(f"    mambapy / ours: {ratio(times['mambapy'], times['ours'])} (goal >= 1)")

    torch.manual_seed(0)
    ours = MambaMixer(d_model, use_fused_kernels=CPU_KERNEL)
    theirs = MambaBlock(MambaConfig(d_model=d_model, n_layers=1, pscan=True))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(batch, length, d_model, requires_grad=True)
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    times = interleaved({"ours": (ours, [x]), "mambapy": (theirs, [x])}, reps)
    print(f"    whole mixer     ours:    {fmt(times['ours'])}")
    print(f"    whole mixer     mambapy: {fmt(times['mambapy'])}   (max |out diff| {diff:.1e})")
    print(f"    mambapy / ours: {ratio(times['mambapy'], times['ours'])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--part", choices=["a", "b", "k", "both"], default="both",
                        help="a: scaling, b: vs mambapy, both: a and b, k: the fused kernel's calls alone")
    parser.add_argument("--scan", choices=["kernel", "pure"], default="kernel",
                        help="our scan: the fused CPU kernel (falls back to pure where it does not build) or pure PyTorch")
    args = parser.parse_args()
    global CPU_KERNEL
    CPU_KERNEL = args.scan == "kernel"
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"load average {load}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, float32, our scan: "
          f"{'fused CPU kernel' if CPU_KERNEL and mamba_cpu.load() is not None else 'pure PyTorch'}")
    if args.part in ("a", "both"):
        scaling(args.reps)
    if args.part in ("b", "both"):
        versus_mambapy(args.reps)
    if args.part == "k":
        kernel_alone(args.reps)


if __name__ == "__main__":
    main()
