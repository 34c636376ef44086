"""Run a benchmark suite: ``python run_suite.py suite=<name> [scale=tiny] [force=true]``.

A suite (suites/suite/*.yaml) is configuration only: data, schedule, the backbones and the methods
(route sets) to cross. This script expands it into runs, validates every run before any training
(bad input gets one line naming the fix), then trains each run, skipping runs that already finished
and resuming interrupted ones from their checkpoint, and writes the suite's result tables.
"""
from __future__ import annotations

import hashlib
import json
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from backbones import list_backbones
from backbones.registry import ConfigError
from diffusion.checkpoint import atomic_write_text
from measure.results import environment, upsert_csv

RUN_KEY = ["suite", "scale", "run_id", "step"]


@dataclass
class RunSpec:
    suite: str
    scale: str
    backbone: str
    size: str
    method: str
    routes: list
    selection: str
    overrides: dict = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return f"{self.backbone}-{self.size.replace('/', '')}-{self.method}"

    def routes_str(self) -> str:
        return " ".join(f"r({r['start']}->{r['end']})@{r['rate']:g}" for r in self.routes) or "none"


def resolve_suite(cfg: DictConfig) -> DictConfig:
    """The composed suite (scale changes already merged by Hydra), resolved and detached."""
    return OmegaConf.create(OmegaConf.to_container(cfg.suite, resolve=True))


def expand_runs(suite: DictConfig, scale: DictConfig) -> list[RunSpec]:
    runs = []
    for entry in suite.backbones:
        size = scale.size or entry.size
        for method, spec in suite.methods.items():
            routes = [dict(r) for r in (spec.get("routes") or [])]
            runs.append(RunSpec(suite.name, scale.name, entry.name, size, method, routes,
                                spec.get("selection", entry.get("selection", suite.get("selection", "auto"))),
                                dict(entry.get("overrides") or {})))
    return runs


def validate_run(run: RunSpec, data_shape, num_classes: int):
    """Build the run's network on the meta device: checks backbone, size, shape and routes for free."""
    from diffusion.train import build_denoiser

    if run.backbone not in list_backbones():
        raise ConfigError(f"unknown backbone '{run.backbone}' in suite {run.suite}; "
                          f"registered: {', '.join(list_backbones())}")
    with torch.device("meta"):
        den = build_denoiser(run.backbone, run.size, data_shape, num_classes, run.routes, run.selection,
                             **run.overrides)
    return den


def config_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def train_macs_per_image(run: RunSpec, data_shape, num_classes: int) -> float:
    """Training MACs per image (forward + backward, DiT convention) of the run's routed network."""
    from measure.flops import flops_table_row

    row = flops_table_row(run.backbone, run.size, run.routes, run.selection, input_size=data_shape[1],
                          in_channels=data_shape[0], num_classes=num_classes)
    return row["gflops_train"] * 1e9


def train_one(run: RunSpec, suite: DictConfig, data, run_dir: Path, device: str, snapshot: dict):
    """Train (or resume) one run; returns (summary, evaluation rows)."""
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
        from data import load_dataset

        ref = load_dataset(suite.data.name, suite.data.resolution, split=eval_cfg.reference_split,
                           limit=eval_cfg.reference_limit)
        fid = FIDEvaluator(eval_cfg, ref.images, f"{ref.name}-{len(ref)}", data.num_classes)

    def on_eval(tr):
        recent = [s["loss"] for s in tr.stats[-3:]] or [float("nan")]
        row = {"step": tr.step, "images_seen": tr.images_seen, "wall_time_s": tr.elapsed,
               "train_flops": macs_per_image * tr.images_seen, "loss": sum(recent) / len(recent)}
        if fid is not None:
            row.update(fid(tr.ema_denoiser, data.shape, tr.acc.device))
        tr.evals.append(row)

    summary = trainer.train(on_eval=on_eval, eval_every=eval_cfg.every)
    summary.update(resumed=resumed, params=sum(p.numel() for p in den.net.backbone.parameters()))
    return summary, trainer.evals


def run_train_suite(cfg: DictConfig, suite: DictConfig) -> int:
    from data import load_dataset
    from measure.results import write_markdown
    from measure.speedup import plot_curves, speedup_table

    runs = expand_runs(suite, cfg.scale)
    if cfg.only:
        runs = [r for r in runs if cfg.only in r.run_id]
    data = load_dataset(suite.data.name, suite.data.resolution, limit=suite.data.get("limit"),
                        **(suite.data.get("kwargs") or {}))
    for run in runs:  # every run is checked before the first one trains; "auto" selection is resolved
        run.selection = validate_run(run, data.shape, data.num_classes).net.selection
    device = "cuda" if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device == "cuda" else "cpu"
    results_dir, runs_root = Path(cfg.results_dir), Path(cfg.runs_dir) / suite.name / cfg.scale.name
    results_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(suite, resolve=True)
    atomic_write_text(results_dir / f"{suite.name}_{cfg.scale.name}_config.yaml", OmegaConf.to_yaml(suite))
    rows, failures = [], []
    for run in runs:
        run_dir = runs_root / run.run_id
        snapshot = {"suite": resolved, "run": run.__dict__}
        digest = config_hash(snapshot)
        done_file = run_dir / "result.json"
        if not cfg.force and done_file.exists():
            done = json.loads(done_file.read_text())
            if done and done[0].get("config_hash") == digest and done[0].get("status") == "ok":
                print(f"[{run.run_id}] finished earlier, skipped (force=true reruns it)")
                rows.extend(done)
                continue
        if run_dir.exists() and (cfg.force or not (run_dir / "checkpoint.pt").exists()):
            for stale in ("checkpoint.pt", "stats.jsonl", "result.json"):
                (run_dir / stale).unlink(missing_ok=True)
        print(f"[{run.run_id}] {run.method}: routes {run.routes_str()}, selection {run.selection}")
        base = {"suite": run.suite, "scale": run.scale, "run_id": run.run_id, "backbone": run.backbone,
                "size": run.size, "method": run.method, "routes": run.routes_str(), "selection": run.selection,
                "seed": int(suite.get("seed", 0)), **environment(device), "config_hash": digest}
        try:
            summary, evals = train_one(run, suite, data, run_dir, device, snapshot)
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
        atomic_write_text(done_file, json.dumps(run_rows, indent=1, default=str))
        rows.extend(run_rows)
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


SUITE_KINDS = {"train": run_train_suite}


@hydra.main(config_path="suites", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> int:
    suite = resolve_suite(cfg)
    kind = suite.get("kind", "train")
    if kind not in SUITE_KINDS:
        raise ConfigError(f"suite {suite.name}: unknown kind '{kind}'; one of {', '.join(SUITE_KINDS)}")
    return SUITE_KINDS[kind](cfg, suite)


def cli() -> None:
    try:
        code = main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)


if __name__ == "__main__":
    cli()
