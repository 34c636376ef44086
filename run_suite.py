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
    return summary, trainer.evals


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
    device = "cuda" if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device == "cuda" else "cpu"
    results_dir, runs_root = Path(cfg.results_dir), Path(cfg.runs_dir) / suite.name / cfg.scale.name
    resolved = OmegaConf.to_container(suite, resolve=True)
    if main_process:
        results_dir.mkdir(parents=True, exist_ok=True)
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
        if main_process and run_dir.exists() and (cfg.force or not (run_dir / "checkpoint.pt").exists()):
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


def _entries(suite: DictConfig, scale: DictConfig):
    """(backbone entry, size, {method: (routes, selection)}) for measurement suites."""
    for entry in suite.backbones:
        size = scale.size or entry.size
        methods = {m: ([dict(r) for r in (spec.get("routes") or [])],
                       spec.get("selection", entry.get("selection", suite.get("selection", "auto"))))
                   for m, spec in suite.methods.items()}
        yield entry, size, methods


def run_flops_suite(cfg: DictConfig, suite: DictConfig) -> int:
    """results/<suite>.csv: forward/training GFLOPs (DiT convention) unrouted and routed, both counters."""
    from measure.flops import flops_table_row
    from measure.results import write_markdown

    d = suite.data
    published = dict(suite.get("published") or {})
    rows = []
    for entry, size, methods in _entries(suite, cfg.scale):
        for method, (routes, selection) in methods.items():
            row = flops_table_row(entry.name, size, routes, selection, input_size=d.resolution,
                                  in_channels=d.channels, num_classes=d.num_classes)
            ref = published.get(f"{entry.name}-{size}")
            row.update(suite=suite.name, scale=cfg.scale.name, method=method, published_gflops=ref,
                       published_rel_err=(row["gflops_fwd"] - ref) / ref if ref else None)
            print(f"{entry.name} {size} {method}: {row['gflops_fwd']:.2f} -> {row['gflops_fwd_routed']:.2f} GFLOPs "
                  f"(x{row['ratio']:.2f}; counters differ by {100 * row['counter_rel_diff']:.2f}%)")
            rows.append(row)
    return _write_table(cfg, suite, rows, ["suite", "scale", "backbone", "size", "method"],
                        ["FLOPs: " + rows[0]["convention"] if rows else ""])


def run_throughput_suite(cfg: DictConfig, suite: DictConfig) -> int:
    """results/<suite>.csv: interleaved training-step timing of every method per backbone."""
    from measure.throughput import cpu_peak_rss_mb, make_train_step, measure_interleaved, predicted_speedup

    device = "cuda" if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device == "cuda" else "cpu"
    precision = suite.precision if suite.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    d = suite.data
    shape = (d.channels, d.resolution, d.resolution)
    rows = []
    for entry, size, methods in _entries(suite, cfg.scale):
        specs = {m: dict(backbone=entry.name, size=size, routes=r, selection=sel, data_shape=shape,
                         num_classes=d.num_classes, batch=suite.batch, overrides=dict(entry.get("overrides") or {}))
                 for m, (r, sel) in methods.items()}
        for spec in specs.values():  # validate before anything runs
            validate_run(RunSpec(suite.name, cfg.scale.name, spec["backbone"], size, "-", spec["routes"],
                                 spec["selection"], spec["overrides"]), shape, d.num_classes)
        steps = {m: make_train_step(spec, device, precision) for m, spec in specs.items()}
        timing = measure_interleaved(steps, suite.warmup, suite.rounds, device)
        base = timing[suite.baseline]
        for m, t in timing.items():
            predicted = predicted_speedup(specs[suite.baseline], specs[m])
            measured = base["p50_s"] / t["p50_s"]
            peak = t["peak_mem_mb"]
            if device == "cpu" and suite.get("cpu_peak_rss", True):
                peak = cpu_peak_rss_mb(specs[m], precision)
            rows.append({"suite": suite.name, "scale": cfg.scale.name, "backbone": entry.name, "size": size,
                         "method": m, "routes": RunSpec("", "", "", "", "", specs[m]["routes"], "").routes_str(),
                         "batch": suite.batch, "precision": precision, "steps_measured": t["n"],
                         "warmup_steps": suite.warmup, "mean_ms": 1e3 * t["mean_s"], "p50_ms": 1e3 * t["p50_s"],
                         "p90_ms": 1e3 * t["p90_s"], "samples_per_s": suite.batch / t["mean_s"],
                         "peak_mem_mb": peak, "peak_mem_kind": "cuda max allocated" if device == "cuda"
                         else ("process peak RSS" if suite.get("cpu_peak_rss", True) else "not measured"), "measured_speedup": measured, "predicted_speedup": predicted,
                         "measured_over_predicted": measured / predicted, **environment(device)})
            print(f"{entry.name} {size} {m}: p50 {1e3 * t['p50_s']:.1f} ms, speedup {measured:.3f} "
                  f"(FLOPs predict {predicted:.3f})")
    return _write_table(cfg, suite, rows, ["suite", "scale", "backbone", "size", "method"],
                        ["Interleaved A B A B after warm-up; speedup = baseline p50 / method p50; predicted = "
                         "training-MAC ratio."])


def _write_table(cfg, suite, rows, key, notes) -> int:
    from measure.results import write_markdown
    import pandas as pd

    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = suite.get("results_file") or f"{suite.name}.csv"
    table = upsert_csv(out / name, rows, key)
    write_markdown(out / name.replace(".csv", ".md"), pd.DataFrame(rows), f"{suite.name} ({cfg.scale.name})",
                   [n for n in notes if n] + [f"Measured on {environment().get('device')}."])
    atomic_write_text(out / f"{suite.name}_{cfg.scale.name}_config.yaml", OmegaConf.to_yaml(suite))
    print(f"wrote {out / name} ({len(rows)} rows of {len(table)})")
    return 0


SUITE_KINDS = {"train": run_train_suite, "flops": run_flops_suite, "throughput": run_throughput_suite}


@hydra.main(config_path="suites", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Errors are reported here, inside the task: Hydra would print a traceback, and it drops the return value.
    try:
        suite = resolve_suite(cfg)
        kind = suite.get("kind", "train")
        if kind not in SUITE_KINDS:
            raise ConfigError(f"suite {suite.name}: unknown kind '{kind}'; one of {', '.join(SUITE_KINDS)}")
        code = SUITE_KINDS[kind](cfg, suite)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
