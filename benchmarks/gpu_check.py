"""The one prepared check of the full-scale path on a GPU (run it through benchmarks/gpu_check.sh): writes
results/gpu_check.md naming the GPU. Every part either measures or fails the script; nothing is skipped.

1. Training-step throughput, interleaved A B A B after warm-up (tread_bench/measure/throughput.py: the training
   loop's own step), bf16 autocast, 256x256 latents (4x32x32), DiT-B/2 and DiT-XL/2, baseline and TREAD
   r(2->depth-4)@0.5, eager and compiled blocks, TF32 on and off; RWKV-B/2 and Mamba-B/2 eager and compiled
   (Mamba's fused kernels asserted). Per row: p50 step, img/s, MFU (training FLOPs = 3 x the forward as trained, 2 FLOPs per
   multiply-add, over the GPU's dense bf16 peak) and peak allocated memory.
2. Host syncs per training step (torch.cuda.set_sync_debug_mode("warn"): each synchronising call warns) over
   steps between two log points, and at a log point.
3. FID sampling throughput: EDM Heun samples/s of the EMA-sized B/2 model in bf16 autocast.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion import build_objective  # noqa: E402
from tread_bench.data import ImageSet  # noqa: E402
from tread_bench.measure.cost import PEAKS  # noqa: E402
from tread_bench.measure.flops import torch_forward_macs  # noqa: E402
from tread_bench.measure.throughput import make_train_step, measure_interleaved  # noqa: E402
from tread_bench.methods import build_network  # noqa: E402
from tread_bench.training.trainer import Trainer, TrainConfig, build_accelerator  # noqa: E402

SHAPE, CLASSES = (4, 32, 32), 1000


def fail(message: str) -> None:
    print(f"gpu_check: FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def peak_flops(name: str, given: float | None) -> tuple[float, str]:
    if given:
        return given * 1e12, "given on the command line"
    for gpu, peak in PEAKS.items():
        if gpu.lower() in name.lower().replace(" ", ""):
            return peak, f"tread_bench.measure.cost.PEAKS['{gpu}']"
    if "h200" in name.lower():  # the H100's compute die: the same dense bf16 peak (NVIDIA H200 datasheet)
        return PEAKS["H100"], "PEAKS['H100'] (the H200 has the H100's compute die)"
    fail(f"no dense bf16 peak known for '{name}'; pass --peak-tflops")


def routes_for(depth: int) -> list:
    return [{"start": 2, "end": depth - 4, "rate": 0.5}]


def network(backbone: str, size: str, routed: bool):
    """EDM around the baseline or TREAD r(2->depth-4)@0.5 network of ``backbone`` at ``size``."""
    net = build_network(backbone, size, SHAPE, CLASSES, "tread", routes=[])
    if routed:
        net = build_network(backbone, size, SHAPE, CLASSES, "tread", routes=routes_for(net.backbone.depth))
    return build_objective("edm").wrap(net)


def training_macs(backbone: str, size: str, routed: bool) -> float:
    with torch.device("meta"):
        den = network(backbone, size, routed)
    return 3 * torch_forward_macs(den.net, SHAPE, CLASSES)["macs"]


def throughput_rows(configs, batch: int, warmup: int, rounds: int, peak: float) -> list[dict]:
    """configs: [(backbone, size, method, execution, tf32)], timed interleaved in one measurement."""
    steps, macs = {}, {}
    for backbone, size, method, execution, tf32 in configs:
        torch.manual_seed(0)
        den = network(backbone, size, method == "tread")
        steps[(backbone, size, method, execution, tf32)] = make_train_step(
            build_objective("edm"), den, SHAPE, CLASSES, batch, "cuda", "bf16", compiled=execution == "compiled",
            tf32=tf32)
        macs[(backbone, size, method)] = training_macs(backbone, size, method == "tread")
    timing = measure_interleaved(steps, warmup, rounds, "cuda")
    rows = []
    for key, t in timing.items():
        backbone, size, method, execution, tf32 = key
        base = timing[(backbone, size, "baseline", execution, tf32)]
        img_s = batch / t["p50_s"]
        rows.append({"backbone": backbone, "size": size, "method": method, "execution": execution, "tf32": tf32,
                     "batch": batch, "p50_ms": 1e3 * t["p50_s"], "img_per_s": img_s,
                     "speedup": base["p50_s"] / t["p50_s"],
                     "predicted": macs[(backbone, size, "baseline")] / macs[(backbone, size, method)],
                     "mfu": img_s * 2 * macs[(backbone, size, method)] / peak, "peak_mem_gib": t["peak_mem_mb"] / 1024})
    return rows


def syncs_per_step(steps_between_logs: int = 5) -> dict:
    """Synchronising calls warned about by CUDA's sync debug mode in the trainer's own loop over one log window."""
    torch.manual_seed(0)
    den = network("dit", "B/2", True)
    data = ImageSet(torch.randn(64, *SHAPE), torch.randint(CLASSES, (64,)), CLASSES, "random")
    cfg = TrainConfig(global_batch=32, precision="bf16", loader_workers=0, log_every=steps_between_logs,
                      steps=10 ** 6)
    tr = Trainer(den, data, cfg, Path(tempfile.mkdtemp()) / "run", accelerator=build_accelerator("bf16", "cuda"))
    for _ in range(3):  # warm-up: optimizer state, allocator, autotuning
        tr.unread.append(tr.train_step())
    tr.read_losses()
    torch.cuda.synchronize()
    counts = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps_between_logs):
                tr.unread.append(tr.train_step())
            counts["between_logs"] = len([w for w in caught if "synchroniz" in str(w.message).lower()])
            caught.clear()
            tr.read_losses()
            counts["at_log_point"] = len([w for w in caught if "synchroniz" in str(w.message).lower()])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counts["per_step"] = counts["between_logs"] / steps_between_logs
    return counts


def sampling_rate(samples: int, batch: int, sampler_steps: int) -> dict:
    from diffusion.sampler import SamplerConfig
    from tread_bench.measure.evaluate import generate

    torch.manual_seed(0)
    den = network("dit", "B/2", False).cuda().eval()
    sampler = SamplerConfig(steps=sampler_steps)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        generate(den, batch, SHAPE, CLASSES, sampler, 0, batch, "cuda")  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        images = generate(den, samples, SHAPE, CLASSES, sampler, 0, batch, "cuda")
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if not torch.isfinite(images).all():
        fail("FID sampling in bf16 produced non-finite samples")
    return {"samples": samples, "sampler_steps": sampler_steps, "batch": batch, "seconds": seconds,
            "samples_per_s": samples / seconds}


def markdown(rows: list[dict]) -> str:
    import pandas as pd

    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "gpu_check.md"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU (default: known GPUs)")
    p.add_argument("--fid-samples", type=int, default=1000)
    args = p.parse_args()
    if not torch.cuda.is_available():
        fail("no CUDA device: this check runs on a GPU only")
    from backbones.mamba import import_fused_kernels

    kernels, why = import_fused_kernels()
    if kernels is None:
        fail(f"Mamba's fused kernels do not import ({why}): install the cuda extra (TREAD_CUDA_EXTRA=1 scripts/setup.sh)")
    name = torch.cuda.get_device_name()
    peak, peak_source = peak_flops(name, args.peak_tflops)
    started = time.perf_counter()
    sections = []
    for size in ("B/2", "XL/2"):
        configs = [("dit", size, m, e, True) for m in ("baseline", "tread") for e in ("eager", "compiled")]
        configs += [("dit", size, m, "eager", False) for m in ("baseline", "tread")]
        rows = throughput_rows(configs, args.batch, args.warmup, args.rounds, peak)
        sections.append((f"DiT-{size}: baseline and TREAD, eager/compiled, TF32 on/off", rows))
        print(markdown(rows), flush=True)
    # eager and compiled: training compiles blocks on CUDA by default, so the scan backbones must compile too
    scans = [(bb, "B/2", m, e, True) for bb in ("rwkv", "mamba") for m in ("baseline", "tread") for e in ("eager", "compiled")]
    rows = throughput_rows(scans, args.batch, args.warmup, args.rounds, peak)
    sections.append(("RWKV-B/2 and Mamba-B/2, eager and compiled (Mamba on mamba-ssm's kernels, asserted above)", rows))
    print(markdown(rows), flush=True)
    syncs = syncs_per_step()
    print(syncs, flush=True)
    if syncs["between_logs"]:
        fail(f"{syncs['between_logs']} host syncs inside training steps between log points (expected 0)")
    fid = sampling_rate(args.fid_samples, 250, 40)
    print(fid, flush=True)
    lines = [f"# GPU check: {name}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}; peak {peak / 1e12:.0f} TFLOP/s dense bf16 "
             f"({peak_source}); batch {args.batch}, {args.warmup} warm-up steps, {args.rounds} interleaved rounds; "
             f"bf16 autocast; 4x32x32 latents, 1000 classes. Command: `bash benchmarks/gpu_check.sh`. "
             f"Wall time {time.perf_counter() - started:.0f} s.", "",
             "speedup: baseline p50 / method p50 at the same execution and TF32 setting; predicted: training-MAC "
             "ratio; MFU: img/s x 2 x training MACs per image / peak.", ""]
    for title, rows in sections:
        lines += [f"## {title}", "", markdown(rows), ""]
    lines += ["## Host syncs in the training loop (torch.cuda.set_sync_debug_mode)", "",
              f"{syncs['between_logs']} in 5 steps between log points ({syncs['per_step']:g} per step); "
              f"{syncs['at_log_point']} at the log point (the loss read).", "",
              "## FID sampling throughput", "",
              f"DiT-B/2, EDM Heun {fid['sampler_steps']} steps, batch {fid['batch']}, bf16 autocast: "
              f"{fid['samples_per_s']:.1f} samples/s ({fid['samples']} samples in {fid['seconds']:.1f} s).", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
