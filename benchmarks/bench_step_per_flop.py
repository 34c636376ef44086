"""Training-step time per training MAC of each backbone, and its ratio to DiT.

One step = the training loop's step (``tread_bench.measure.throughput.make_train_step``: EDM loss, backward, AdamW, EMA), all
configurations timed interleaved A B A B (``tread_bench.measure.throughput.measure_interleaved``); the p50 step
time is divided by the training MACs of one step (``tread_bench.measure.flops.training_macs``: 3 x forward
MACs, scans by their ``scan_macs`` estimate, x batch). A backbone that turns its MACs into time as
efficiently as DiT has ratio 1.

    python benchmarks/bench_step_per_flop.py --size S/2 --batch 4 --threads 2
    python benchmarks/bench_step_per_flop.py --depth 12 --hidden-size 96 --patch-size 4 \\
        --input-size 32 --channels 1 --num-classes 10 --batch 32 --threads 1 --routed

``--routed`` adds every backbone again with the route r(2->8)@0.5 (``--route``, ``--selection``);
routed rows are compared with routed DiT. ``--pure`` adds Mamba again on its pure-PyTorch scan
(``use_fused_kernels=False``), the path every CPU ran before the fused CPU scan, timed in the same
interleaved rounds. DiT's head count: ``--num-heads``, else the size's own
when it divides the width, else width / 16 (or 1).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", default="dit,rwkv,mamba", help="comma-separated registered backbones")
    p.add_argument("--size", default="S/2", help="size name every backbone knows (overrides below win)")
    p.add_argument("--depth", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--num-heads", type=int, help="DiT only")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--routed", action="store_true", help="also time each backbone with --route")
    p.add_argument("--route", default="2-8@0.5", help="start-end@rate")
    p.add_argument("--selection", default="rows", help="random, rows or auto")
    p.add_argument("--pure", action="store_true", help="also time Mamba on its pure-PyTorch scan")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # before torch starts its thread pools
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    import backbones  # noqa: F401  (registers the backbones)
    from backbones.registry import backbone_sizes
    from diffusion import build_objective
    from tread_bench.methods import build_network
    from tread_bench.measure.flops import count_forward_macs, training_macs
    from tread_bench.measure.throughput import make_train_step, measure_interleaved

    torch.set_num_threads(args.threads)
    span, _, rate = args.route.partition("@")
    start, end = map(int, span.split("-"))
    route = [{"start": start, "end": end, "rate": float(rate or 0.5)}]
    names = [b.strip() for b in args.backbones.split(",") if b.strip()]

    def overrides(backbone):
        out = {k: v for k, v in (("depth", args.depth), ("hidden_size", args.hidden_size),
                                 ("patch_size", args.patch_size)) if v is not None}
        if backbone == "dit":
            width = args.hidden_size or backbone_sizes("dit")[args.size]["hidden_size"]
            heads = args.num_heads or backbone_sizes("dit")[args.size]["num_heads"]
            if width % heads:
                heads = max(1, width // 16)
            out["num_heads"] = heads
        return out

    shape = (args.channels, args.input_size, args.input_size)
    specs = {}
    variants = [(name, name, {}) for name in names]
    if args.pure and "mamba" in names:
        variants.append(("mamba (pure)", "mamba", {"use_fused_kernels": False}))
    for label, name, extra in variants:
        for routes in ([[]] + ([route] if args.routed else [])):
            key = (label, "r({}->{})@{:g}".format(start, end, route[0]["rate"]) if routes else "none")
            specs[key] = dict(backbone=name, size=args.size, data_shape=shape, num_classes=args.num_classes,
                              routes=routes, selection=args.selection, batch=args.batch,
                              overrides={**overrides(name), **extra})

    def build(spec):
        objective = build_objective("edm")
        return objective, objective.wrap(build_network(spec["backbone"], spec["size"], shape, args.num_classes,
                                                       routes=spec["routes"], selection=spec["selection"],
                                                       overrides=spec["overrides"]))

    macs = {}
    for key, spec in specs.items():
        with torch.device("meta"):
            _, den = build(spec)
        fwd = count_forward_macs(den.net, args.input_size, args.channels, args.num_classes,
                                 routed=bool(spec["routes"]))
        macs[key] = training_macs(den.net, args.input_size, args.channels, args.num_classes,
                                  routed=bool(spec["routes"]), forward=fwd)["train_macs"] * args.batch

    steps = {key: make_train_step(*build(spec), shape, args.num_classes, args.batch, args.device, "fp32")
             for key, spec in specs.items()}
    timed = measure_interleaved({f"{b} {r}": s for (b, r), s in steps.items()}, args.warmup, args.rounds,
                                args.device)

    from backbones import mamba_cpu

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, input "
          f"{args.channels}x{args.input_size}x{args.input_size}, size {args.size} overrides "
          f"{ {k: v for k, v in overrides('mamba').items()} }, selection {args.selection}, "
          f"warmup {args.warmup}, rounds {args.rounds} (interleaved), load average {load:.2f}, fused CPU scan "
          f"{'built' if mamba_cpu.load() is not None else 'unavailable (Mamba runs its pure scan)'}")
    print(f"| backbone | routes | ms/step p50 | ms/step mean | train GMACs/step | ns/train MAC | ratio to DiT |")
    print("|---|---|---|---|---|---|---|")
    for (b, r) in specs:
        t = timed[f"{b} {r}"]
        ns = t["p50_s"] * 1e9 / macs[(b, r)]
        ref = ("dit", r)
        ratio = ns / (timed[f"dit {r}"]["p50_s"] * 1e9 / macs[ref]) if ref in macs else float("nan")
        print(f"| {b} | {r} | {t['p50_s'] * 1e3:.1f} | {t['mean_s'] * 1e3:.1f} | {macs[(b, r)] / 1e9:.3f} | "
              f"{ns:.4f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
