"""Training memory per GPU: an estimate from the network's shape, and a measured peak on CPU to check it.

Estimate (:func:`estimate_training_memory`), per process at batch ``B``: 20 bytes per parameter (fp32 weights,
gradients, AdamW's two moments, EMA) + ``B x sum over blocks of (tokens the block sees x its width) x k`` bytes,
``k`` = :data:`ACTIVATION_BYTES`, measured (the slope of a step's peak memory in the batch size); it errs high, by
design. Measured (:func:`measure_cpu_peak`): a fresh process's peak RSS minus its RSS before the network is built.
Details: docs/internals.md#tread_benchmeasurememorypy
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
from typing import Dict, List, Optional

import torch

from tread_bench.core.processes import die_with_parent, spawning_children

#: bytes per parameter kept for the whole run, fp32 in mixed precision too
STATE_BYTES_PER_PARAM = {"weights": 4, "grads": 4, "adamw": 8, "ema": 4}

#: bytes per token, per block, per unit of width saved for backward (see the module docstring): fp32 measured on
#: CPU (DiT-S/2, batch 2 -> 6, slope of the peak RSS); bf16 = 0.6 x fp32, assumed.
ACTIVATION_BYTES = {"fp32": 140.0, "bf16": 0.6 * 140.0}


def block_shapes(net, data_shape, num_classes: int) -> List[tuple]:
    """[(tokens, width)] of every block's input in one batch-1 training forward of ``net`` (a method network)
    on the meta device: the tokens a method lets each block see, and the block width; the backbone's blocks,
    then the method's own (``method_blocks``: MaskDiT's decoder, at its width over the full sequence)."""
    blocks = list(net.blocks) + list(net.method_blocks())
    shapes: List[Optional[tuple]] = [None] * len(blocks)

    def hook(index):
        def record(module, args):
            shapes[index] = (int(args[0].shape[1]), int(args[0].shape[-1]))
        return record

    handles = [b.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    was_training = {m: m.training for m in net.modules()}
    try:
        net.train()
        c, h, w = data_shape
        with torch.device("meta"), torch.no_grad():
            x = torch.zeros(1, c, h, w)
            net(x, torch.zeros(1), torch.zeros(1, dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in was_training.items():
            module.training = training
    if any(s is None for s in shapes):
        raise RuntimeError(f"{type(net).__name__}: some blocks did not run in a training forward")
    return shapes


def estimate_training_memory(net, data_shape, num_classes: int, batch: int, precision: str = "bf16",
                             params: Optional[int] = None) -> Dict[str, float]:
    """Estimated bytes per process of training ``net`` (built on the meta device) at per-process ``batch``:
    {weights, grads, adamw, ema, activations, total} in bytes, and the activation factor used."""
    if params is None:
        params = sum(p.numel() for p in net.parameters())
    key = "fp32" if precision in ("fp32", "no") else "bf16"
    per_image = sum(tokens * width for tokens, width in block_shapes(net, data_shape, num_classes))
    out = {name: float(params * nbytes) for name, nbytes in STATE_BYTES_PER_PARAM.items()}
    out["activations"] = float(batch * per_image * ACTIVATION_BYTES[key])
    out["total"] = sum(out[k] for k in (*STATE_BYTES_PER_PARAM, "activations"))
    out["activation_bytes_per_token_block_width"] = ACTIVATION_BYTES[key]
    out["token_width_per_image"] = float(per_image)
    return out


# ------------------------------------------------------------------------------------------------
# measured peak on CPU
# ------------------------------------------------------------------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: ``5`` to /proc/self/clear_refs), so that a peak reached
    before the measurement (importing modules, unpickling the spawned call) does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    """The peak RSS since :func:`reset_peak_rss` (VmHWM), or over the process's life (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux


def rss_mib() -> float:
    """This process's resident memory now, MiB."""
    return _rss_mb()


def peak_rss_mib() -> float:
    """This process's peak resident memory, MiB (VmHWM: since start, or since :func:`reset_peak_rss`). In a process
    started for one run (tread_bench/engine/lifecycle.py's dry run), it is that run's peak."""
    return _peak_mb()


def _probe(build, data_shape, num_classes: int, batch: int, steps: int, precision: str, queue, parent_pid) -> None:
    from .throughput import make_train_step

    die_with_parent(parent_pid)
    torch.set_num_threads(1)
    reset_peak_rss()
    before = _rss_mb()
    objective, model = build()
    step = make_train_step(objective, model, data_shape, num_classes, batch, "cpu", precision)
    built = _rss_mb()
    for _ in range(steps):
        step()
    peak = _peak_mb()
    queue.put({"before_mb": before, "built_mb": built, "peak_mb": peak, "growth_mb": peak - before,
               "params": sum(p.numel() for p in model.parameters())})


def measure_cpu_peak(build, data_shape, num_classes: int, batch: int, steps: int = 2, precision: str = "fp32",
                     timeout: float = 600) -> Dict[str, float]:
    """Peak RSS (MiB) of a fresh process that trains ``steps`` steps of the training loop at ``batch`` on CPU:
    ``build`` (picklable, no arguments) returns ``(objective, objective.wrap(method network))``. ``peak_mb`` is the
    process's peak, ``growth_mb`` its growth from before ``build`` was called: what the estimate predicts."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_probe, args=(build, data_shape, num_classes, batch, steps, precision, queue,
                                             os.getpid()))
    with spawning_children():
        proc.start()
    try:
        value = queue.get(timeout=timeout)
    finally:  # also on a stop (SIGINT, SIGTERM) or a timeout: the probe does not outlive the call
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
            proc.join()
    return value


def fit_activation_factor(build, data_shape, num_classes: int, batches=(2, 6), steps: int = 2) -> Dict[str, float]:
    """The fp32 activation factor k of :data:`ACTIVATION_BYTES`: the slope of the measured peak in the batch,
    per token x width summed over blocks (``python -m tread_bench.measure.memory`` prints it for DiT-S/2)."""
    with torch.device("meta"):
        _, model = build()
    per_image = sum(t * w for t, w in block_shapes(model.net, data_shape, num_classes))
    low, high = (measure_cpu_peak(build, data_shape, num_classes, b, steps) for b in batches)
    slope = (high["peak_mb"] - low["peak_mb"]) * 2**20 / (batches[1] - batches[0])
    return {"bytes_per_image": slope, "token_width_per_image": per_image, "factor": slope / per_image,
            "low": low, "high": high}


def _edm_dit(routes):
    from diffusion import build_objective
    from tread_bench.methods import build_network

    objective = build_objective("edm")
    return objective, objective.wrap(build_network("dit", "S/2", (4, 32, 32), 1000, routes=routes))


def main() -> None:
    """Fit the fp32 activation factor on DiT-S/2 (32x32x4, 1000 classes) and compare the estimate with the
    measured peak of DiT-S/2 without and with TREAD r(2->8)@0.5 at batch 4."""
    import json
    from functools import partial

    shape, classes = (4, 32, 32), 1000
    fit = fit_activation_factor(partial(_edm_dit, []), shape, classes)
    print(json.dumps({k: v for k, v in fit.items()}, default=float))
    for routes in ([], [{"start": 2, "end": 8, "rate": 0.5}]):
        build = partial(_edm_dit, routes)
        with torch.device("meta"):
            _, model = build()
        est = estimate_training_memory(model.net, shape, classes, 4, "fp32")
        got = measure_cpu_peak(build, shape, classes, 4)
        print(f"routes {routes}: estimate {est['total'] / 2**20:.0f} MiB "
              f"(activations {est['activations'] / 2**20:.0f}), measured growth {got['growth_mb']:.0f} MiB, "
              f"error {100 * (est['total'] / 2**20 / got['growth_mb'] - 1):+.1f}%")


if __name__ == "__main__":
    main()


def peak_memory(device: str) -> dict:
    """This process's peak RSS (MiB) and, on CUDA, the allocator's peak (torch.cuda.max_memory_allocated)."""
    out = {"peak_rss_mib": peak_rss_mib()}
    if torch.device(device).type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out
