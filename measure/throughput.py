"""Training throughput, measured the way benchmark suites agree on (timm, optimum-benchmark, EDM2).

Protocol: every configuration gets its warm-up steps (not measured); then measured steps run
interleaved, A B A B ..., so slow drift of the machine (thermal, other load) hits all
configurations alike. One step = the objective's loss (objectives/, the call the training loop makes)
forward + backward + AdamW update on a fixed batch.
Reported per configuration: mean, p50 and p90 step time, samples/s (batch / mean step time), peak
memory (CUDA max allocated; on CPU the peak RSS of a separate process that runs two steps of that
configuration alone, since RSS cannot be split between interleaved configurations in one process).
The measured speedup is baseline p50 / method p50 (the median resists outlier steps); the
predicted one is the ratio of training MACs from measure/flops.py.
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import time
from typing import Callable, Dict, List

import numpy as np
import torch

from methods import build_network
from objectives import build_objective


def build_spec_network(spec: dict, seed: int = 0):
    """``spec``'s method network, through methods.build_network (the one build function): backbone, size,
    data_shape, num_classes, overrides, kind (default tread), method_args (TREAD: routes, selection; the
    top-level ``routes``/``selection`` keys are accepted too)."""
    args = {k: spec[k] for k in ("routes", "selection") if k in spec}
    return build_network(spec["backbone"], spec["size"], spec["data_shape"], spec["num_classes"],
                         spec.get("kind", "tread"), seed=seed, overrides=spec.get("overrides"),
                         **args, **spec.get("method_args", {}))


def make_train_step(spec: dict, device: str, precision: str, seed: int = 0) -> Callable[[], None]:
    """A closure that runs one training step of ``spec`` (the network keys of :func:`build_spec_network`,
    batch, and ``objective``: {name: edm|flow, ...}, default edm): the objective's loss, as training runs it."""
    torch.manual_seed(seed)
    objective = build_objective(**spec.get("objective", {"name": "edm"}))
    den = objective.wrap(build_spec_network(spec, seed)).to(device).train()
    opt = torch.optim.AdamW(den.parameters(), lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    b = spec["batch"]
    x = torch.randn(b, *spec["data_shape"], generator=g).to(device)
    y = torch.randint(spec["num_classes"], (b,), generator=g).to(device)
    draws = {k: v.to(device) for k, v in objective.draw(b, spec["data_shape"], g).items()}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    device_type = torch.device(device).type

    def step():
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = objective.loss(den, x, y, draws).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_interleaved(steps: Dict[str, Callable[[], None]], warmup: int, rounds: int,
                        device: str = "cpu") -> Dict[str, dict]:
    """Warm each configuration up, then time ``rounds`` interleaved passes over all of them."""
    cuda = torch.device(device).type == "cuda"
    times: Dict[str, List[float]] = {name: [] for name in steps}
    peak: Dict[str, int] = {name: 0 for name in steps}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
    _sync(device)
    for _ in range(rounds):
        for name, step in steps.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    out = {}
    for name, ts in times.items():
        arr = np.asarray(ts)
        out[name] = {"mean_s": arr.mean(), "p50_s": float(np.percentile(arr, 50)),
                     "p90_s": float(np.percentile(arr, 90)), "n": len(arr),
                     "peak_mem_mb": peak[name] / 2**20 if cuda else float("nan")}
    return out


def _rss_probe(spec, precision, queue):
    torch.set_num_threads(1)
    step = make_train_step(spec, "cpu", precision)
    step()
    step()
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB -> MiB on Linux


def cpu_peak_rss_mb(spec: dict, precision: str = "fp32") -> float:
    """Peak RSS (MiB) of a fresh process running two steps of ``spec`` alone (includes the interpreter)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_probe, args=(spec, precision, queue))
    proc.start()
    value = queue.get(timeout=600)
    proc.join()
    return float(value)


def forward_macs(spec: dict) -> float:
    """Forward MACs per image of ``spec``'s network (torch counter on the meta device); the training-MAC
    ratio of two specs is the ratio of these, since training = 3 x forward for both."""
    from measure.flops import count_forward_macs

    with torch.device("meta"):
        net = build_spec_network(spec)
    c, h, _ = spec["data_shape"]
    return count_forward_macs(net, h, c, spec["num_classes"], routed=True)["torch_macs"]
