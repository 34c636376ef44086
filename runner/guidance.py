"""The guidance kind: one TREAD model sampled unguided, with classifier-free guidance and with
selection-rate guidance at equal sampler steps; FID and sampling cost per image for each mode.

Sampling cost per image = network evaluations (the objective's sampler: EDM Heun 2 * steps - 1, flow Heun
2 * steps, flow Euler steps) x MACs of the passes per evaluation: one full pass (unguided), two full passes (CFG), or one routed pass at g1 plus one at g2
(selection-rate guidance), each counted by measure/flops.py with routing forced at that rate.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from core.io import atomic_write_text
from diffusion.checkpoint import CHECKPOINT_PATHS
from measure.results import environment
from objectives import build_objective

from .measure import write_table
from .resume import prepare_run_dir
from .spec import config_hash, expand_runs, pick_device, validate_run
from .train import fid_reference, train_one


def pass_macs(net, data_shape, num_classes: int, force_rate=None) -> float:
    from measure.flops import count_forward_macs

    c, h, _ = data_shape
    routed = force_rate is not None
    return count_forward_macs(net, h, c, num_classes, force_rate=force_rate, routed=routed)["torch_macs"]


def run_guidance_suite(cfg: DictConfig, suite: DictConfig) -> int:
    from data import load_dataset
    from measure.evaluate import EvalConfig, FIDEvaluator

    data = load_dataset(suite.data.name, suite.data.resolution, limit=suite.data.get("limit"),
                        **(suite.data.get("kwargs") or {}))
    (run,) = [r for r in expand_runs(suite, cfg.scale) if r.method == "tread"]
    run.selection = validate_run(run, data.shape, data.num_classes).net.selection
    device = pick_device(cfg.device)
    base_eval = OmegaConf.to_container(suite.eval)
    reference = fid_reference(suite, EvalConfig(**base_eval))  # checked before training starts
    train_suite = OmegaConf.merge(suite, {"eval": {"samples": 0, "every": 0}})
    snapshot = {"suite": OmegaConf.to_container(train_suite, resolve=True), "run": asdict(run)}
    run_dir = Path(cfg.runs_dir) / suite.name / cfg.scale.name / run.run_id
    # resume only a checkpoint of this configuration (as the train kind does)
    prepare_run_dir(run_dir, config_hash(snapshot), cfg.force, (*CHECKPOINT_PATHS, "stats.jsonl", "guidance.json"))
    summary, trainer = train_one(run, train_suite, data, run_dir, device, snapshot, cfg.get("tracker", "none"))
    den = trainer.ema_denoiser
    objective = build_objective(**run.objective)
    steps = int(base_eval["sampler_steps"])
    nfe = objective.nfe(steps)
    full = pass_macs(den.net, data.shape, data.num_classes)
    rows = []
    for mode, spec in suite.sampling.items():
        spec = dict(spec or {})
        ev = EvalConfig(**{**base_eval, **spec})
        if ev.rate_guidance:
            g1, g2, _ = ev.rate_guidance
            per_eval = pass_macs(den.net, data.shape, data.num_classes, g1)
            per_eval += 0 if g1 == g2 else pass_macs(den.net, data.shape, data.num_classes, g2)
        else:
            per_eval = full * (2 if ev.cfg_scale != 1.0 else 1)
        metrics = FIDEvaluator(ev, *reference, data.num_classes, objective)(den, data.shape, device)
        row = {"suite": suite.name, "scale": cfg.scale.name, "backbone": run.backbone, "size": run.size,
               "routes": run.routes_str(), "train_steps": summary["steps"], "mode": mode,
               "nfe": nfe, "sampling_gflops_per_image": nfe * per_eval / 1e9,
               "cost_vs_unguided": per_eval / full, **metrics, **environment(device),
               "config_hash": config_hash(snapshot)}
        print(f"{mode}: FID {row['fid']:.2f}, {row['sampling_gflops_per_image']:.2f} GFLOPs/image")
        rows.append(row)
    atomic_write_text(run_dir / "guidance.json", json.dumps(rows, indent=1, default=str))
    return write_table(cfg, suite, rows, ["suite", "scale", "backbone", "size", "mode"],
                       ["Same EMA model and sampler noise for every mode; GFLOPs in DiT's MAC convention."])
