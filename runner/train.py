"""The train kind: each run trained (or resumed), evaluated, and written into the suite's tables."""
from __future__ import annotations

import json
from dataclasses import asdict
import sys
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from backbones.registry import ConfigError
from diffusion.checkpoint import atomic_write_text
from measure.results import environment, upsert_csv

from .spec import RunSpec, config_hash, expand_runs, pick_device, validate_run

RUN_KEY = ["suite", "scale", "run_id", "seed", "step"]


def train_macs_per_image(run: RunSpec, data_shape, num_classes: int) -> float:
    """Training MACs per image (forward + backward, DiT convention) of the run's routed network."""
    from measure.flops import flops_table_row

    row = flops_table_row(run.backbone, run.size, run.routes, run.selection, input_size=data_shape[1],
                          in_channels=data_shape[0], num_classes=num_classes)
    return row["gflops_train"] * 1e9




def fid_reference(suite: DictConfig, eval_cfg):
    """(reference, name): an npz of statistics, or the images of the suite's reference split."""
    from data import load_dataset

    if eval_cfg.reference_npz:
        if not Path(eval_cfg.reference_npz).exists():
            raise ConfigError(f"missing FID reference {eval_cfg.reference_npz}; fix suite.eval.reference_npz")
        return str(eval_cfg.reference_npz), Path(eval_cfg.reference_npz).stem
    if suite.data.name == "latents":
        raise ConfigError("FID on latents needs suite.eval.reference_npz (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)"
                          " or ADM_REFERENCE set; or set suite.eval.samples=0")
    ref = load_dataset(suite.data.name, suite.data.resolution, split=eval_cfg.reference_split,
                       limit=eval_cfg.reference_limit)
    return ref.images, f"{ref.name}-{len(ref)}"


def train_one(run: RunSpec, suite: DictConfig, data, run_dir: Path, device: str, snapshot: dict):
    """Train (or resume) one run; returns (summary, trainer); trainer.evals holds the evaluation rows."""
    from diffusion.train import Trainer, TrainConfig, build_denoiser
    from measure.evaluate import EvalConfig, FIDEvaluator

    train_cfg = TrainConfig(**OmegaConf.to_container(suite.train), seed=int(suite.get("seed", 0)))
    eval_cfg = EvalConfig(**OmegaConf.to_container(suite.get("eval") or {}))
    torch.manual_seed(train_cfg.seed)
    den = build_denoiser(run.backbone, run.size, data.shape, data.num_classes, run.routes, run.selection,
                         fp32_after_route=train_cfg.fp32_after_route, seed=train_cfg.seed + 1, **run.overrides)
    trainer = Trainer(den, data, train_cfg, run_dir, config_snapshot=snapshot)
    resumed = trainer.try_resume()
    macs_per_image = train_macs_per_image(run, data.shape, data.num_classes)
    fid = None
    if eval_cfg.samples > 0:
        fid = FIDEvaluator(eval_cfg, *fid_reference(suite, eval_cfg), data.num_classes)

    def on_eval(tr):
        recent = [s["loss"] for s in tr.stats[-3:]] or [float("nan")]
        row = {"step": tr.step, "images_seen": tr.images_seen, "wall_time_s": tr.elapsed,
               "train_flops": macs_per_image * tr.images_seen, "loss": sum(recent) / len(recent)}
        if fid is not None:
            row.update(fid(tr.ema_denoiser, data.shape, tr.acc.device))
        tr.evals.append(row)

    summary = trainer.train(on_eval=on_eval, eval_every=eval_cfg.every)
    summary.update(resumed=resumed, params=sum(p.numel() for p in den.net.backbone.parameters()))
    return summary, trainer


def run_train_suite(cfg: DictConfig, suite: DictConfig) -> int:
    from data import load_dataset
    from measure.results import write_markdown
    from measure.speedup import plot_curves, speedup_table

    from accelerate import PartialState

    main_process = PartialState().is_main_process  # under `accelerate launch`, only rank 0 writes files
    runs = expand_runs(suite, cfg.scale)
    if cfg.only:
        runs = [r for r in runs if cfg.only in r.run_id]
    data = load_dataset(suite.data.name, suite.data.resolution, limit=suite.data.get("limit"),
                        **(suite.data.get("kwargs") or {}))
    for run in runs:  # every run is checked before the first one trains; "auto" selection is resolved
        run.selection = validate_run(run, data.shape, data.num_classes).net.selection
    device = pick_device(cfg.device)
    results_dir, runs_root = Path(cfg.results_dir), Path(cfg.runs_dir) / suite.name / cfg.scale.name
    resolved = OmegaConf.to_container(suite, resolve=True)
    if main_process:
        results_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results_dir / f"{suite.name}_{cfg.scale.name}_config.yaml", OmegaConf.to_yaml(suite))
    rows, failures = [], []
    seed = int(suite.get("seed", 0))
    for run in runs:
        run_dir = runs_root / (run.run_id if seed == 0 else f"{run.run_id}-seed{seed}")
        snapshot = {"suite": resolved, "run": asdict(run)}
        digest = config_hash(snapshot)
        done_file = run_dir / "result.json"
        if not cfg.force and done_file.exists():
            done = json.loads(done_file.read_text())
            if done and done[0].get("config_hash") == digest and done[0].get("status") == "ok":
                print(f"[{run.run_id}] finished earlier, skipped (force=true reruns it)")
                rows.extend({**row, "routes": run.routes_str()} for row in done)  # resolved route notation
                continue
        hash_file = run_dir / "config_hash"
        resumable = (run_dir / "checkpoint.pt").exists() and hash_file.exists() and hash_file.read_text() == digest
        if main_process and run_dir.exists() and (cfg.force or not resumable):
            # never resume a checkpoint written under another configuration
            for stale in ("checkpoint.pt", "stats.jsonl", "result.json"):
                (run_dir / stale).unlink(missing_ok=True)
        if main_process:
            atomic_write_text(hash_file, digest)
        print(f"[{run.run_id}] {run.method}: routes {run.routes_str()}, selection {run.selection}")
        base = {"suite": run.suite, "scale": run.scale, "run_id": run.run_id, "backbone": run.backbone,
                "size": run.size, "method": run.method, "routes": run.routes_str(), "selection": run.selection,
                "seed": int(suite.get("seed", 0)), **environment(device), "config_hash": digest}
        try:
            summary, trainer = train_one(run, suite, data, run_dir, device, snapshot)
            evals = trainer.evals
            base.update(params=summary["params"], steps=summary["steps"], final_loss=summary["final_loss"],
                        samples_per_s=summary["samples_per_s"], status="ok", error="")
            run_rows = [{**base, **e} for e in evals]
        except ConfigError:
            raise
        except Exception as err:  # one failed run must not stop the suite or touch other runs' files
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            print(f"[{run.run_id}] FAILED: {reason}", file=sys.stderr)
            if type(err).__name__ != "TrainingDiverged":
                traceback.print_exc(file=sys.stderr)
            run_rows = [{**base, "status": "failed", "error": reason}]
            failures.append(run.run_id)
        if main_process:
            atomic_write_text(done_file, json.dumps(run_rows, indent=1, default=str))
        rows.extend(run_rows)
    if not main_process:
        return 1 if failures else 0
    results_file = suite.get("results_file") or f"{suite.name}_runs.csv"
    table = upsert_csv(results_dir / results_file, rows, RUN_KEY)
    print(f"wrote {results_dir / results_file} ({len(rows)} rows of {len(table)})")
    ok = table[(table.suite == suite.name) & (table.scale == cfg.scale.name) & (table.status == "ok")]
    if ok.method.nunique() > 1:
        stem = results_dir / f"{suite.name}_speedup"
        speed = speedup_table(ok)
        speed.insert(0, "scale", cfg.scale.name)
        upsert_csv(f"{stem}.csv", speed.to_dict("records"), ["scale", "backbone", "size", "method"])
        write_markdown(f"{stem}.md", speed, f"{suite.name} speedup ({cfg.scale.name})",
                       [f"Device: {ok.device.iloc[0]}; torch {ok.torch.iloc[0]}.",
                        "flop_ratio: baseline / method training MACs per step; iteration_speedup: baseline / method "
                        "seconds per step; convergence_speedup: baseline time to its best FID / method time to "
                        "that FID (linear interpolation between evaluations)."])
        plot_curves(ok, str(results_dir / f"{suite.name}_{cfg.scale.name}"))
    if failures:
        print(f"{len(failures)} of {len(runs)} runs failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


