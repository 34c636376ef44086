"""The guidance kind: each run (method entry x seed) trained once, then sampled in every sampling mode that applies
to its method at equal sampler steps; FID, KID and sampling cost per image for each (run, mode), summarised over
training seeds per (method, mode).

Modes (``suite.sampling``, each an EvalConfig fragment) apply to every method unless they name the method kinds
(``kinds: [sprint]``) or method entries (``methods: [tread, sprint]``) they are for: Sparse Guidance needs a
sparsity rate to force (the baseline, a TREAD network without routes, has none), path-drop guidance
(``{cfg_scale: s, uncond_rate: 1.0, kinds: [sprint]}``) needs a sparse path to drop.

Training is the train kind's (tread_bench.engine.lifecycle: locked, resumable run folders, ``suite.jobs`` runs at a
time on the CPU); the training configuration leaves ``suite.sampling`` out, so adding a mode samples the trained
models again without retraining them. Each run's finished modes are kept in its ``sampling/<mode>.json``: a
stopped suite resumes at the modes it had not finished. Sampling shares the (run, mode) pairs among ``suite.jobs``
worker processes on the CPU.

Sampling cost per image = network evaluations (the objective's sampler: EDM Heun 2 * steps - 1, flow Heun
2 * steps, flow Euler steps) x MACs of the passes per evaluation: one full pass (unguided), two full passes
(CFG), one full pass plus one at ``uncond_rate`` (CFG with a forced unconditional branch: PDG), or one pass at the
strong rate plus one at the weak rate (Sparse Guidance), each counted by tread_bench/measure/flops.py at that rate.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write_text
from tread_bench.engine.kinds import register_suite_kind
from tread_bench.engine.schema import check_section, check_uncond_rate
from tread_bench.engine.spec import build_run_network, config_hash, load_suite_data, pick_device, prepare_runs
from tread_bench.engine.lifecycle import collect_runs, fid_reference, run_in_workers, train_pending, trained_ema
from tread_bench.measure.results import environment, tables_lock, upsert_csv

SAMPLING_DIR = "sampling"  # a run's finished modes: sampling/<mode>.json, its row
ROW_KEY = ["suite", "scale", "backbone", "size", "method", "seed", "mode"]


def modes_for(sampling, kind: str, method: str) -> dict:
    """{mode: EvalConfig keys} of the modes that apply to method entry ``method`` of kind ``kind`` (``kinds`` and
    ``methods`` removed)."""
    modes = {}
    for mode, spec in sampling.items():
        spec = dict(spec or {})
        kinds, methods = spec.pop("kinds", None), spec.pop("methods", None)
        if (kinds is None or kind in kinds) and (methods is None or method in methods):
            modes[mode] = spec
    return modes


def forced_rates(spec) -> list:
    """The rates a sampling mode forces on the network (each must be one the method can run)."""
    g = spec.get("sparse_guidance")
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
    sampling: Optional[Dict[str, Any]] = None   # {mode: EvalConfig keys, plus optional kinds / methods filters}


def check_guidance_suite(suite: dict) -> None:
    """suite.sampling: {mode: EvalConfig keys, plus optional ``kinds: [method kinds]`` and ``methods: [method
    entries]`` the mode applies to}. Which modes apply to which method entry is checked by the guidance kind before
    it trains."""
    from tread_bench.measure.evaluate import EvalConfig
    from tread_bench.methods import list_methods

    sampling = suite.get("sampling")
    if not sampling:
        raise ConfigError("suite.sampling is empty; a guidance suite names its sampling modes, e.g. "
                          "{unguided: {}, cfg: {cfg_scale: 1.5}}")
    for mode, spec in sampling.items():
        spec = dict(spec or {})
        kinds, methods = spec.pop("kinds", None), spec.pop("methods", None)
        if kinds is not None and (not isinstance(kinds, (list, tuple)) or not kinds
                                  or any(k not in list_methods() for k in kinds)):
            raise ConfigError(f"suite.sampling.{mode}.kinds = {kinds!r}: must be a non-empty list of method kinds "
                              f"(the kinds the mode applies to), from: {', '.join(list_methods())}")
        entries = list(suite.get("methods") or {})
        if methods is not None and (not isinstance(methods, (list, tuple)) or not methods
                                    or any(m not in entries for m in methods)):
            raise ConfigError(f"suite.sampling.{mode}.methods = {methods!r}: must be a non-empty list of the suite's "
                              f"method entries (the ones the mode applies to), from: {', '.join(entries)}")
        check_section(f"suite.sampling.{mode}", "eval", spec, EvalConfig)
        check_uncond_rate(f"suite.sampling.{mode}", spec)


def training_suite(suite: DictConfig) -> DictConfig:
    """The suite as its runs train: evaluated at the final step only and without FID (sampling comes after, per
    mode); without ``sampling``, so that the modes are not part of a run's configuration; and without ``dryrun``:
    a dry run of this kind runs whole in one fresh process (tread_bench/engine/dryrun.py), and its runs keep their
    checkpoints until they are sampled."""
    train = OmegaConf.merge(suite, {"eval": {"samples": 0, "every": 0}})
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(train).items() if k not in ("sampling", "dryrun")})


@register_suite_kind("guidance", keys=GuidanceKeys, check=check_guidance_suite, trains=True)
def run_guidance_suite(cfg: DictConfig, suite: DictConfig) -> int:
    import torch

    from tread_bench.measure.evaluate import EvalConfig, FIDEvaluator

    started = time.perf_counter()
    data = load_suite_data(suite)
    runs = prepare_runs(cfg, suite, data.shape, data.num_classes, only=True)
    run_modes = {}
    for run in runs:  # every run and mode is checked before anything trains
        with torch.device("meta"):
            net = build_run_network(run, data.shape, data.num_classes)
        run_modes[run.dir_name] = modes_for(suite.sampling, run.kind, run.method)
        _check_modes(run, net, run_modes[run.dir_name])
    device = pick_device(cfg.device)
    base_eval = OmegaConf.to_container(suite.eval)
    reference = fid_reference(suite, EvalConfig(**base_eval))  # checked before training starts
    results_dir = Path(cfg.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results_dir / f"{suite.name}_{cfg.scale.name}_config.yaml", OmegaConf.to_yaml(suite))

    train_suite = training_suite(suite)
    resolved = OmegaConf.to_container(train_suite, resolve=True)
    _, pending, finished = collect_runs(cfg, train_suite, runs, resolved, device, data, extra_state=(SAMPLING_DIR,))
    if pending:
        print(f"{suite.name} ({cfg.scale.name}): {len(pending)} runs to train, then every run sampled in its modes")
    _, failures = train_pending(pending, cfg, train_suite, data, device, resolved)
    trained = [(run, run_dir) for run, run_dir, _, _ in pending if run.dir_name not in failures] + finished
    if not trained:
        print("no trained runs to sample")
        return 1 if failures else 0

    FIDEvaluator(EvalConfig(**base_eval), *reference, data.num_classes).prepare_reference()  # once, not per worker
    common = {"suite": OmegaConf.to_container(suite, resolve=True), "train_suite": resolved, "device": device,
              "scale": cfg.scale.name, "imports": list(cfg.get("imports") or [])}
    # workers get one job per (run, mode), so they share the modes evenly whichever model they belong to; this
    # process samples a run's modes in one job, reading its data, reference and model once
    jobs = [{**common, "run": run, "run_dir": str(run_dir), "modes": {mode: spec}}
            for run, run_dir in trained for mode, spec in run_modes[run.dir_name].items()]
    workers = max(1, min(suite.get("jobs", 1), len(jobs))) if device != "cuda" else 1
    rows = []
    if workers == 1:
        for run, run_dir in trained:
            rows += sample_modes({**common, "run": run, "run_dir": str(run_dir), "modes": run_modes[run.dir_name],
                                  "threads": 0})
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        print(f"sampling {len(trained)} runs in {len(jobs)} modes in all, {workers} worker processes, "
              f"{threads} thread(s) each")

        def done(k, result, err):
            if err is not None:
                name = f"{jobs[k]['run'].dir_name} {next(iter(jobs[k]['modes']))}"
                failures.append(name)
                print(f"[{name}] sampling FAILED: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
            else:
                rows.extend(result)

        run_in_workers(sample_modes, [{**job, "threads": threads} for job in jobs], workers, done)
    with tables_lock(results_dir, suite.name):
        write_guidance_tables(cfg, suite, rows, results_dir)
    print(f"suite wall time this sitting: {time.perf_counter() - started:.0f} s ({len(pending)} runs trained or "
          f"resumed, {len(finished)} finished earlier; {len(trained)} sampled)")
    if failures:
        print(f"{len(failures)} runs failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def sample_modes(job: dict) -> list[dict]:
    """One trained run sampled in each mode of ``job["modes"]`` (in a worker process or this one): its rows, one per
    mode. A mode finished earlier under the same configuration is read back from the run's sampling/<mode>.json."""
    import torch

    from tread_bench.engine.imports import import_user_modules
    from tread_bench.measure.evaluate import EvalConfig, FIDEvaluator
    from tread_bench.measure.flops import pass_macs, sampling_macs
    from tread_bench.measure.samples import sample_grid, save_grid

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    import_user_modules(job["imports"])
    run, run_dir, device = job["run"], Path(job["run_dir"]), job["device"]
    suite, train_suite = OmegaConf.create(job["suite"]), OmegaConf.create(job["train_suite"])
    data = load_suite_data(suite)
    base_eval = OmegaConf.to_container(suite.eval)
    reference = fid_reference(suite, EvalConfig(**base_eval))
    den, objective = trained_ema(run, train_suite, data, run_dir)
    den.to(device)
    digest = config_hash({"suite": job["train_suite"], "run": asdict(run)})
    nfe = objective.nfe(base_eval["sampler_steps"])
    full = pass_macs(den.net, data.shape, data.num_classes)
    rows = []
    for mode, spec in job["modes"].items():
        ev = EvalConfig(**{**base_eval, **spec})
        mode_hash = config_hash({"train": digest, "eval": asdict(ev)})
        done_file = run_dir / SAMPLING_DIR / f"{mode}.json"
        done = json.loads(done_file.read_text()) if done_file.exists() else {}
        if done.get("mode_hash") == mode_hash:
            print(f"[{run.dir_name}] {mode}: sampled earlier, FID {done['fid']:.2f}")
            rows.append(done)
            continue
        evaluator = FIDEvaluator(ev, *reference, data.num_classes, objective)
        clock = time.perf_counter()
        metrics = evaluator(den, data.shape, device)
        seconds = time.perf_counter() - clock
        per_eval = sampling_macs(den.net, data.shape, data.num_classes, ev, full)
        grid = ""
        if ev.grid_per_class > 0:
            images, cols = sample_grid(den, data.shape, data.num_classes, evaluator.sampler, ev.grid_per_class,
                                       ev.grid_seed, device, None, objective)
            grid = str(save_grid(images, cols, run_dir / "samples" / f"{mode}.png"))
        row = {"suite": run.suite, "scale": job["scale"], "backbone": run.backbone, "size": run.size,
               "method": run.method, "kind": run.kind, "seed": run.seed, "setting": run.setting,
               "train_steps": train_suite.train.steps, "mode": mode,
               "cfg_scale": ev.cfg_scale, "uncond_rate": ev.uncond_rate,
               "strong_rate": ev.sparse_guidance[0] if ev.sparse_guidance else None,
               "weak_rate": ev.sparse_guidance[1] if ev.sparse_guidance else None,
               "sg_scale": ev.sparse_guidance[2] if ev.sparse_guidance else None,
               "nfe": nfe, "sampling_gflops_per_image": nfe * per_eval / 1e9, "cost_vs_unguided": per_eval / full,
               "sampling_s": seconds, **metrics, "grid": grid, **environment(device), "config_hash": digest,
               "mode_hash": mode_hash}
        print(f"[{run.dir_name}] {mode}: FID {row['fid']:.2f}, {row['sampling_gflops_per_image']:.3f} GFLOPs/image, "
              f"{seconds:.0f} s", flush=True)
        rows.append(row)
        done_file.parent.mkdir(exist_ok=True)
        atomic_write_text(done_file, json.dumps(row, indent=1, default=str))
    return rows


def write_guidance_tables(cfg: DictConfig, suite: DictConfig, rows: list[dict], results_dir: Path) -> None:
    """The per-run table (one row per run and mode), then the summary over training seeds and the figures."""
    from tread_bench.measure.guidance import write_summary

    if not rows:
        print("no sampled runs to write")
        return
    name = suite.get("results_file") or f"{suite.name}.csv"
    table = upsert_csv(results_dir / name, rows, ROW_KEY)
    print(f"wrote {results_dir / name} ({len(rows)} rows of {len(table)})")
    mine = table[(table.suite == suite.name) & (table.scale == cfg.scale.name)]
    for path in write_summary(mine, results_dir, suite.name, cfg.scale.name):
        print(f"wrote {path}")
