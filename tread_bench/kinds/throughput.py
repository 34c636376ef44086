"""The throughput kind: every method's training step timed interleaved against the baseline's on one backbone,
the measured speedup beside the one the training FLOPs predict (tread_bench/measure/throughput.py)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from omegaconf import DictConfig

from tread_bench.core.errors import ConfigError
from tread_bench.engine.kinds import register_suite_kind
from tread_bench.engine.schema import non_negative, one_of, positive
from tread_bench.engine.spec import build_run_model, pick_device, prepare_runs
from tread_bench.engine.tables import write_table
from tread_bench.measure.results import environment
from tread_bench.measure.flops import torch_forward_macs
from tread_bench.measure.memory import measure_cpu_peak
from tread_bench.measure.throughput import make_train_step, measure_interleaved
from tread_bench.training.precision import compile_blocks_on, resolve_precision


@dataclass
class ThroughputKeys:
    batch: Optional[int] = None          # images per timed step
    warmup: Optional[int] = None         # untimed steps per configuration
    rounds: Optional[int] = None         # interleaved timed passes over all configurations
    precision: Optional[str] = None      # auto (the training rule), fp32, bf16 or fp16
    cpu_peak_rss: Optional[bool] = None  # on CPU, each configuration's peak RSS in a fresh process
    baseline: Optional[str] = None       # the method every speedup is relative to
    execution: Optional[list] = None     # [auto] (as training: compiled on CUDA only), [eager], [compiled] or both
    tf32: Optional[bool] = None          # CUDA: TF32 for fp32 matmuls, as training sets it (default true)


RULES = {"batch": (positive, "> 0"), "warmup": (non_negative, ">= 0"), "rounds": (positive, "> 0"),
         "precision": (one_of("auto", "fp32", "bf16", "fp16"), "one of auto, fp32, bf16, fp16"),
         "execution": (lambda modes: len(modes) > 0 and all(m in EXECUTIONS for m in modes),
                       "a non-empty list of auto, eager and/or compiled")}
EXECUTIONS = ("auto", "eager", "compiled")


def check_throughput_suite(suite: dict) -> None:
    methods = suite.get("methods") or {}
    baseline = suite.get("baseline", "baseline")
    if methods.get(baseline) is None:
        raise ConfigError(f"suite.baseline = {baseline}: not a method of this suite; one of "
                          f"{', '.join(m for m, e in methods.items() if e is not None)}")


@register_suite_kind("throughput", keys=ThroughputKeys, rules=RULES, check=check_throughput_suite)
def run_throughput_suite(cfg: DictConfig, suite: DictConfig) -> int:
    """results/<suite>.csv: interleaved training-step timing of every method per backbone."""
    device = pick_device(cfg.device)
    precision = resolve_precision(suite.precision, device)
    cpu_rss = device == "cpu" and suite.get("cpu_peak_rss", True)
    memory_kind = "cuda max allocated" if device == "cuda" else ("process peak RSS" if cpu_rss else "not measured")
    d = suite.data
    shape = (d.channels, d.resolution, d.resolution)
    runs = prepare_runs(cfg, suite, shape, d.num_classes)  # every run validated before anything is timed
    executions = list(dict.fromkeys(("compiled" if compile_blocks_on("auto", device) else "eager") if e == "auto" else e
                                    for e in suite.get("execution") or ["auto"]))
    tf32 = bool(suite.get("tf32", True)) and device == "cuda"
    rows = []
    for backbone, size in dict.fromkeys((r.backbone, r.size) for r in runs):
        group = {r.method: r for r in runs if (r.backbone, r.size) == (backbone, size)}
        builders = {m: partial(build_run_model, r, shape, d.num_classes) for m, r in group.items()}
        # every (method, execution) interleaved in one measurement: A B A' B' ...
        steps = {(m, e): make_train_step(*build(), shape, d.num_classes, suite.batch, device, precision,
                                         compiled=e == "compiled", tf32=tf32)
                 for m, build in builders.items() for e in executions}
        timing = measure_interleaved(steps, suite.warmup, suite.rounds, device)
        macs = {}
        for m, build in builders.items():
            with torch.device("meta"):
                _, model = build()
            macs[m] = torch_forward_macs(model.net, shape, d.num_classes)["macs"]
        base = suite.baseline
        for (m, e), t in timing.items():
            predicted = macs[base] / macs[m]
            measured = timing[(base, e)]["p50_s"] / t["p50_s"]
            peak = (measure_cpu_peak(builders[m], shape, d.num_classes, suite.batch, precision=precision)["peak_mb"]
                    if cpu_rss and e == "eager" else t["peak_mem_mb"])
            rows.append({"suite": suite.name, "scale": cfg.scale.name, "backbone": backbone, "size": size,
                         "method": m, "execution": e, "tf32": tf32, "setting": group[m].setting,
                         "batch": suite.batch, "precision": precision,
                         "steps_measured": t["n"], "warmup_steps": suite.warmup, "mean_ms": 1e3 * t["mean_s"],
                         "p50_ms": 1e3 * t["p50_s"], "p90_ms": 1e3 * t["p90_s"],
                         "samples_per_s": suite.batch / t["mean_s"], "peak_mem_mb": peak,
                         "peak_mem_kind": memory_kind, "measured_speedup": measured, "predicted_speedup": predicted,
                         "measured_over_predicted": measured / predicted, **environment(device)})
            print(f"{backbone} {size} {m} {e}: p50 {1e3 * t['p50_s']:.1f} ms, speedup {measured:.3f} "
                  f"(FLOPs predict {predicted:.3f})")
    return write_table(cfg, suite, rows, ["suite", "scale", "backbone", "size", "method", "execution"],
                       ["Interleaved A B A B after warm-up; speedup = baseline p50 / method p50 at the same execution "
                        "(eager or compiled blocks); predicted = training-MAC ratio."])
