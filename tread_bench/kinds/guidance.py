"""The guidance kind: each method entry of the suite trained once, then sampled in every sampling mode that
applies to it at equal sampler steps; FID and sampling cost per image for each (method, mode).

Modes (``suite.sampling``, each an EvalConfig fragment) apply to every method unless they name the method
kinds they are for (``kinds: [tread]``): selection-rate guidance needs routes to force, path-drop guidance
(``{cfg_scale: s, uncond_rate: 1.0, kinds: [sprint]}``) needs a sparse path to drop. The default suite trains
TREAD; ``'+suite.methods.sprint={kind: sprint}'`` adds a SPRINT model (its pdg mode then applies), and
``'~suite.methods.tread'`` leaves SPRINT alone.

Sampling cost per image = network evaluations (the objective's sampler: EDM Heun 2 * steps - 1, flow Heun
2 * steps, flow Euler steps) x MACs of the passes per evaluation: one full pass (unguided), two full passes
(CFG), one full pass plus one at ``uncond_rate`` (CFG with a forced unconditional branch: PDG), or one pass at
g1 plus one at g2 (selection-rate guidance), each counted by tread_bench/measure/flops.py at that forced rate.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from dataclasses import dataclass
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write_text
from tread_bench.training.checkpoint import CHECKPOINT_PATHS
from tread_bench.measure.results import environment
from diffusion import build_objective

from tread_bench.engine.kinds import register_suite_kind
from tread_bench.engine.resume import RunBusy, prepare_run_dir, run_lock
from tread_bench.engine.schema import check_section, check_uncond_rate
from tread_bench.engine.spec import build_run_network, config_hash, load_suite_data, pick_device, prepare_runs, suite_seeds
from tread_bench.engine.tables import write_table
from tread_bench.engine.training import fid_reference, train_one
from tread_bench.measure.flops import pass_macs, sampling_macs


def modes_for(sampling, kind: str) -> dict:
    """{mode: EvalConfig keys} of the modes that apply to a method of ``kind`` (``kinds`` removed)."""
    modes = {}
    for mode, spec in sampling.items():
        spec = dict(spec or {})
        kinds = spec.pop("kinds", None)
        if kinds is None or kind in kinds:
            modes[mode] = spec
    return modes


def forced_rates(spec) -> list:
    """The rates a sampling mode forces on the network (each must be one the method can run)."""
    g = spec.get("rate_guidance")
    return [r for r in ([*g[:2]] if g else []) + [spec.get("uncond_rate")] if r is not None]


def _check_modes(run, net, modes: dict) -> None:
    """Before training: some mode must apply to the method, and the method must accept every forced rate
    (Method.tokens_per_block refuses one it cannot run, with its own one-line ConfigError)."""
    if not modes:
        raise ConfigError(f"no mode of suite.sampling applies to method {run.method} (kind {run.kind}); add one "
                          f"without 'kinds' (e.g. unguided: {{}}) or remove suite.methods.{run.method}")
    for mode, spec in modes.items():
        for rate in forced_rates(spec):
            try:
                net.tokens_per_block(force_rate=rate)
            except ConfigError as err:
                raise ConfigError(f"suite.sampling.{mode} forces rate {rate:g} on method {run.method}: {err}") from None


@dataclass
class GuidanceKeys:
    sampling: Optional[Dict[str, Any]] = None   # {mode: EvalConfig keys, plus optional kinds: [method kinds]}


def check_guidance_suite(suite: dict) -> None:
    """suite.sampling: {mode: EvalConfig keys, plus optional ``kinds: [method kinds]`` the mode applies to}.
    Which modes apply to which method entry is checked by the guidance kind before it trains."""
    from tread_bench.measure.evaluate import EvalConfig
    from tread_bench.methods import list_methods

    sampling = suite.get("sampling")
    if not sampling:
        raise ConfigError("suite.sampling is empty; a guidance suite names its sampling modes, e.g. "
                          "{unguided: {}, cfg: {cfg_scale: 1.5}}")
    for mode, spec in sampling.items():
        spec = dict(spec or {})
        kinds = spec.pop("kinds", None)
        if kinds is not None and (not isinstance(kinds, (list, tuple)) or not kinds
                                  or any(k not in list_methods() for k in kinds)):
            raise ConfigError(f"suite.sampling.{mode}.kinds = {kinds!r}: must be a non-empty list of method kinds "
                              f"(the kinds the mode applies to), from: {', '.join(list_methods())}")
        check_section(f"suite.sampling.{mode}", "eval", spec, EvalConfig)
        check_uncond_rate(f"suite.sampling.{mode}", spec)


@register_suite_kind("guidance", keys=GuidanceKeys, check=check_guidance_suite, trains=True)
def run_guidance_suite(cfg: DictConfig, suite: DictConfig) -> int:
    import torch

    from tread_bench.measure.evaluate import EvalConfig, FIDEvaluator

    data = load_suite_data(suite)
    runs = prepare_runs(cfg, suite, data.shape, data.num_classes)
    run_modes = []
    for run in runs:  # every run and mode is checked before anything trains
        with torch.device("meta"):
            net = build_run_network(run, data.shape, data.num_classes)
        modes = modes_for(suite.sampling, run.kind)
        _check_modes(run, net, modes)
        run_modes.append(modes)
    device = pick_device(cfg.device)
    base_eval = OmegaConf.to_container(suite.eval)
    reference = fid_reference(suite, EvalConfig(**base_eval))  # checked before training starts
    train_suite = OmegaConf.merge(suite, {"eval": {"samples": 0, "every": 0}})
    rows = []
    for run, modes in zip(runs, run_modes):
        snapshot = {"suite": OmegaConf.to_container(train_suite, resolve=True), "run": asdict(run)}
        # the run id, as before seeds and several methods were sampled (so earlier folders resume); with
        # several seeds each seed needs its own folder
        folder = run.dir_name if len(suite_seeds(suite)) > 1 else run.run_id
        run_dir = Path(cfg.runs_dir) / suite.name / cfg.scale.name / folder
        # resume only a checkpoint of this configuration (as the train kind does)
        try:
            with run_lock(run_dir):  # one process trains a run folder at a time
                prepare_run_dir(run_dir, config_hash(snapshot), cfg.force,
                                (*CHECKPOINT_PATHS, "stats.jsonl", "guidance.json"))
                summary, trainer = train_one(run, train_suite, data, run_dir, device, snapshot,
                                             cfg.get("tracker", "none"))
        except RunBusy as busy:
            print(f"[{run.dir_name}] skipped: the run folder is {busy}")
            continue
        den = trainer.ema_denoiser
        objective = build_objective(**run.objective)
        steps = int(base_eval["sampler_steps"])
        nfe = objective.nfe(steps)
        full = pass_macs(den.net, data.shape, data.num_classes)
        run_rows = []
        for mode, spec in modes.items():
            ev = EvalConfig(**{**base_eval, **spec})
            per_eval = sampling_macs(den.net, data.shape, data.num_classes, ev, full)
            metrics = FIDEvaluator(ev, *reference, data.num_classes, objective)(den, data.shape, device)
            row = {"suite": suite.name, "scale": cfg.scale.name, "backbone": run.backbone, "size": run.size,
                   "method": run.method, "seed": run.seed, "setting": run.setting,
                   "train_steps": summary["steps"], "mode": mode, "nfe": nfe,
                   "sampling_gflops_per_image": nfe * per_eval / 1e9, "cost_vs_unguided": per_eval / full,
                   **metrics, **environment(device), "config_hash": config_hash(snapshot)}
            print(f"{run.method} {mode}: FID {row['fid']:.2f}, {row['sampling_gflops_per_image']:.2f} GFLOPs/image")
            run_rows.append(row)
        atomic_write_text(run_dir / "guidance.json", json.dumps(run_rows, indent=1, default=str))
        rows += run_rows
    return write_table(cfg, suite, rows, ["suite", "scale", "backbone", "size", "method", "seed", "mode"],
                       ["Same sampler noise for every mode; each method's EMA model; GFLOPs in DiT's MAC "
                        "convention; cost_vs_unguided = MACs per evaluation / one unreduced pass."])
