"""The train kind: each run trained (or resumed), evaluated, and written into the suite's tables."""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError
from core.io import atomic_write_text
from measure.memory import rss_mib
from measure.results import environment, tables_lock, upsert_csv

from .resume import prepare_run_dir
from .reuse import reuse_finished_run
from .tracking import open_tracker
from .spec import RunSpec, build_run_network, config_hash, expand_runs, pick_device, run_stages, validate_run

# A run's rows (one per evaluation) are replaced together: a rerun never leaves rows of an earlier attempt.
RUN_KEY = ["suite", "scale", "run_id", "seed"]
# evaluation columns logged to the tracker (with every eval_loss* column)
EVAL_METRICS = ("fid", "kid", "precision", "recall")


def train_macs_per_stage(run: RunSpec, data_shape, num_classes: int) -> list[float]:
    """Training MACs per image (forward + backward, DiT convention) of the run's network as it trains, one value
    per stage of its schedule (the entry's own settings first; one value without a schedule)."""
    from measure.flops import flops_row

    with torch.device("meta"):
        net = build_run_network(run, data_shape, num_classes)
    macs = [flops_row(net, data_shape[1], data_shape[0], num_classes)["gflops_train"] * 1e9]
    for stage in run_stages(run):
        net.apply_settings(**stage.settings)  # the Method interface, as the trainer changes it
        macs.append(flops_row(net, data_shape[1], data_shape[0], num_classes)["gflops_train"] * 1e9)
    return macs


def cumulative_train_flops(step: int, global_batch: int, starts: list[int], macs: list[float]) -> float:
    """Training FLOPs (MAC convention) of the first ``step`` steps: per stage, its steps x global batch x its
    training MACs per image, summed (``starts``: methods.stage_starts; ``macs``: train_macs_per_stage)."""
    from methods import cumulative_cost

    return cumulative_cost(step, starts, macs, units_per_step=global_batch)  # one stage: macs x images seen

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
                       limit=eval_cfg.reference_limit, **(suite.data.get("kwargs") or {}))
    return ref.images, f"{ref.name}-{len(ref)}"


def held_out_loss(suite: DictConfig, eval_cfg, data, objective=None):
    """The fixed held-out evaluation loss of measure/eval_loss.py, or None when turned off."""
    from data import load_dataset
    from measure.eval_loss import EvalLossConfig, HeldOutLoss

    if eval_cfg.loss_images <= 0:
        return None
    if suite.data.name == "latents":
        path = (suite.eval.get("loss_path") if suite.get("eval") else None)
        if not path:
            print("eval loss: off (latent suites need suite.eval.loss_path, a latent folder of held-out images)")
            return None
        held = load_dataset("latents", suite.data.resolution, path=path, limit=eval_cfg.loss_images)
    else:
        held = load_dataset(suite.data.name, suite.data.resolution, split=eval_cfg.loss_split,
                            limit=eval_cfg.loss_images, **(suite.data.get("kwargs") or {}))
    if held.shape != data.shape:
        raise ConfigError(f"held-out images have shape {held.shape}, training data {data.shape}; fix suite.eval.loss_*")
    cfg = EvalLossConfig(images=eval_cfg.loss_images, levels=eval_cfg.loss_levels, seed=eval_cfg.loss_seed,
                         batch=eval_cfg.loss_batch, split=eval_cfg.loss_split)
    return HeldOutLoss(held.images, held.labels, cfg, objective)


def train_one(run: RunSpec, suite: DictConfig, data, run_dir: Path, device: str, snapshot: dict,
              tracker: str = "none", memory: dict | None = None):
    """Train (or resume) one run; returns (summary, trainer); trainer.evals holds the evaluation rows.

    At every evaluation point (suite.eval.every, and the final step), off the training clock: the held-out
    evaluation loss of the EMA model, a sample grid (same noise and labels for every run and point), and
    FID (at every point, or only the final one with eval.fid_at=final). ``tracker`` (tensorboard, wandb or
    none; runner/tracking.py) logs the training curve, the evaluations and the grids as they happen.
    ``memory`` (a dict; dry runs) gets the process's peak memory at the start of the final evaluation: training's.
    """
    from diffusion.sampler import SamplerConfig
    from diffusion.train import Trainer, TrainConfig
    from measure.evaluate import EvalConfig, FIDEvaluator, decode_latents
    from methods import stage_starts
    from measure.samples import sample_grid, save_grid
    from objectives import build_objective

    train_cfg = TrainConfig(**OmegaConf.to_container(suite.train), seed=run.seed)
    eval_cfg = EvalConfig(**OmegaConf.to_container(suite.get("eval") or {}))
    torch.manual_seed(train_cfg.seed)
    objective = build_objective(**run.objective)
    den = objective.wrap(build_run_network(run, data.shape, data.num_classes, seed=train_cfg.seed + 1,
                                           fp32_after_route=train_cfg.fp32_after_route))
    trainer = Trainer(den, data, train_cfg, run_dir, config_snapshot=snapshot, objective=objective,
                      schedule=run_stages(run))
    resumed = trainer.try_resume()
    trainer.tracker = open_tracker(tracker, run_dir, run.dir_name, f"{run.suite}_{run.scale}", snapshot,
                                   resumed_step=trainer.step)
    stage_macs = train_macs_per_stage(run, data.shape, data.num_classes)  # per image, one per schedule stage
    starts = stage_starts(trainer.stages)
    fid = (FIDEvaluator(eval_cfg, *fid_reference(suite, eval_cfg), data.num_classes, objective)
           if eval_cfg.samples > 0 else None)
    loss = held_out_loss(suite, eval_cfg, data, objective)
    grid_sampler = SamplerConfig(steps=eval_cfg.sampler_steps)
    decode = (lambda z: decode_latents(z, eval_cfg.vae, eval_cfg.latent_scaling, eval_cfg.vae_batch, device)
              ) if eval_cfg.vae else None

    def on_eval(tr):
        recent = [s["loss"] for s in tr.stats[-3:]] or [float("nan")]
        row = {"step": tr.step, "images_seen": tr.images_seen, "wall_time_s": tr.elapsed,
               "train_flops": cumulative_train_flops(tr.step, tr.cfg.global_batch, starts, stage_macs),
               "loss": sum(recent) / len(recent)}
        final = tr.step >= tr.cfg.steps
        if memory is not None and final:
            from .dryrun import peak_memory

            memory.update({f"train_{k}": v for k, v in peak_memory(device).items()})
        if loss is not None:
            row.update(loss(tr.ema_denoiser, tr.acc.device))
        if eval_cfg.grid_per_class > 0 and tr.acc.is_main_process:
            images, cols = sample_grid(tr.ema_denoiser, data.shape, data.num_classes, grid_sampler,
                                       eval_cfg.grid_per_class, eval_cfg.grid_seed, tr.acc.device, decode,
                                       objective)
            path = save_grid(images, cols, run_dir / "samples" / f"step{tr.step:07d}.png")
            row["grid"] = str(path)
            if tr.tracker is not None:
                tr.tracker.log_grid(images, cols, tr.step)
        if fid is not None and (final or eval_cfg.fid_at == "every"):
            row.update(fid(tr.ema_denoiser, data.shape, tr.acc.device))
        tr.evals.append(row)
        if tr.tracker is not None:
            tr.tracker.log({f"eval/{k}": v for k, v in row.items() if k.startswith("eval_loss") or k in EVAL_METRICS},
                           tr.step)

    try:
        summary = trainer.train(on_eval=on_eval, eval_every=eval_cfg.every)
    finally:
        if trainer.tracker is not None:
            trainer.tracker.finish()
    summary.update(resumed=resumed, params=sum(p.numel() for p in den.net.parameters()))
    return summary, trainer


def _train_and_record(run: RunSpec, suite: DictConfig, data, run_dir: Path, device: str, snapshot: dict,
                      base: dict, tracker: str = "none", memory: dict | None = None) -> tuple[list[dict], bool]:
    """Train one run and turn it into table rows; a failure becomes one 'failed' row (never an exception)."""
    try:
        summary, trainer = train_one(run, suite, data, run_dir, device, snapshot, tracker, memory)
        base = {**base, "params": summary["params"], "steps": summary["steps"], "final_loss": summary["final_loss"],
                "samples_per_s": summary["samples_per_s"], "status": "ok", "error": ""}
        return [{**base, **e} for e in trainer.evals], True
    except ConfigError:
        raise
    except Exception as err:  # one failed run must not stop the suite or touch other runs' files
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        print(f"[{run.dir_name}] FAILED: {reason}", file=sys.stderr)
        if type(err).__name__ not in ("TrainingDiverged", "CheckpointError"):  # these explain themselves in one line
            traceback.print_exc(file=sys.stderr)
        return [{**base, "status": "failed", "error": reason}], False


def _worker(job: dict) -> tuple[list[dict], bool]:
    """One run in a worker process (suite.jobs > 1, or a fresh process per run in a dry run): its own threads,
    modules, data and files. In a dry run its rows carry the process's memory (runner/dryrun.py)."""
    from data import load_dataset
    from runner.imports import import_user_modules

    torch.set_num_threads(job["threads"])
    import_user_modules(job["imports"])
    suite = OmegaConf.create(job["suite"])
    data = load_dataset(suite.data.name, suite.data.resolution, limit=suite.data.get("limit"),
                        **(suite.data.get("kwargs") or {}))
    memory = {} if job.get("dryrun") else None
    base_rss, started = rss_mib(), time.perf_counter()  # before the network is built: interpreter, torch, data
    rows, ok = _train_and_record(job["run"], suite, data, Path(job["run_dir"]), job["device"], job["snapshot"],
                                 job["base"], job["tracker"], memory)
    if memory is not None:  # this process ran this one run: its peak is the run's
        from .dryrun import peak_memory

        measured = {"base_rss_mib": base_rss, **memory, **peak_memory(job["device"]),
                    "run_wall_s": time.perf_counter() - started}
        rows = [{**row, **measured} for row in rows]
    atomic_write_text(Path(job["run_dir"]) / "result.json", json.dumps(rows, indent=1, default=str))
    return rows, ok


def run_train_suite(cfg: DictConfig, suite: DictConfig) -> int:
    from data import load_dataset
    from measure.evaluate import EvalConfig, FIDEvaluator

    from accelerate import PartialState

    started = time.perf_counter()
    state = PartialState()
    main_process = state.is_main_process  # under `accelerate launch`, only rank 0 writes files
    runs = expand_runs(suite, cfg.scale)
    if cfg.only:
        runs = [r for r in runs if cfg.only in r.dir_name]
    data = load_dataset(suite.data.name, suite.data.resolution, limit=suite.data.get("limit"),
                        **(suite.data.get("kwargs") or {}))
    for run in runs:  # every run is checked before the first one trains; "auto" selection is resolved
        run.selection = validate_run(run, data.shape, data.num_classes).net.selection
    device = pick_device(cfg.device)
    eval_cfg = EvalConfig(**OmegaConf.to_container(suite.get("eval") or {}))
    fid_ref = fid_reference(suite, eval_cfg) if eval_cfg.samples > 0 else None  # checked before training
    results_dir, runs_root = Path(cfg.results_dir), Path(cfg.runs_dir) / suite.name / cfg.scale.name
    resolved = OmegaConf.to_container(suite, resolve=True)
    if main_process:
        results_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results_dir / f"{suite.name}_{cfg.scale.name}_config.yaml", OmegaConf.to_yaml(suite))
    rows, failures, pending, finished = [], [], [], 0
    for run in runs:
        run_dir = runs_root / run.dir_name
        snapshot = {"suite": resolved, "run": asdict(run)}
        digest = config_hash(snapshot)
        done_file = run_dir / "result.json"
        if not cfg.force and done_file.exists():
            done = json.loads(done_file.read_text())
            if done and done[0].get("config_hash") == digest and done[0].get("status") == "ok":
                print(f"[{run.dir_name}] finished earlier, skipped (force=true reruns it)")
                rows.extend({**row, "routes": run.routes_str()} for row in done)  # resolved route notation
                finished += 1
                continue
        # (one process only: under `accelerate launch` every rank would have to agree on the copy)
        if not cfg.force and not cfg.get("report") and suite.get("reuse_from") and state.num_processes == 1:
            reused = reuse_finished_run(snapshot, digest, run_dir, Path(cfg.runs_dir), list(suite.reuse_from),
                                        cfg.scale.name, data.shape, data.num_classes)
            if reused:
                print(f"[{run.dir_name}] the same run finished in {reused[0]['reused_from']}: copied, not trained")
                rows.extend({**row, "routes": run.routes_str()} for row in reused)
                finished += 1
                continue
        if cfg.get("report"):  # tables from finished runs only: touch nothing of an unfinished run
            print(f"[{run.dir_name}] not finished, left out of the report")
            continue
        prepare_run_dir(run_dir, digest, cfg.force, write=main_process)  # never resume another configuration
        base = {"suite": run.suite, "scale": run.scale, "run_id": run.run_id, "backbone": run.backbone,
                "size": run.size, "method": run.method, "routes": run.routes_str(), "selection": run.selection,
                "seed": run.seed, **environment(device), "config_hash": digest}
        pending.append((run, run_dir, snapshot, base))

    tracker = cfg.get("tracker", "none")
    jobs = max(1, int(suite.get("jobs", 1)))
    if state.num_processes > 1 or device == "cuda":
        jobs = 1  # parallel runs are for CPU machines; GPUs and data-parallel runs take one run at a time
    jobs = min(jobs, max(len(pending), 1))
    if fid_ref is not None and pending and main_process:
        FIDEvaluator(eval_cfg, *fid_ref, data.num_classes).prepare_reference()  # once, not once per worker
    # a dry run trains each run in a fresh process (its peak memory is the run's); not under accelerate launch,
    # whose processes train every run together
    dryrun = bool(suite.get("dryrun")) and state.num_processes == 1

    def job(run, run_dir, snapshot, base, threads):
        return {"run": run, "suite": resolved, "run_dir": str(run_dir), "device": device, "snapshot": snapshot,
                "base": base, "threads": threads, "imports": list(cfg.get("imports") or []), "tracker": tracker,
                "dryrun": dryrun}

    if jobs == 1 and not dryrun:
        for run, run_dir, snapshot, base in pending:
            print(f"[{run.dir_name}] {run.method}: routes {run.routes_str()}, selection {run.selection}")
            run_rows, ok = _train_and_record(run, suite, data, run_dir, device, snapshot, base, tracker)
            if main_process:
                atomic_write_text(run_dir / "result.json", json.dumps(run_rows, indent=1, default=str))
            rows.extend(run_rows)
            failures += [] if ok else [run.dir_name]
    elif dryrun:  # one run at a time (suite.jobs is not read): the machine's memory is for one full-size run
        from .dryrun import drop_checkpoint, run_in_fresh_process

        threads = max(1, os.cpu_count() or 1)
        print(f"dry run: {len(pending)} runs, one at a time, each in a fresh process with {threads} thread(s)")
        for run, run_dir, snapshot, base in pending:
            print(f"[{run.dir_name}] {run.method}: routes {run.routes_str()}, selection {run.selection}")
            try:
                run_rows, ok = run_in_fresh_process(_worker, job(run, run_dir, snapshot, base, threads))
            except RuntimeError as err:  # the process died (e.g. out of memory): this run fails, the next one runs
                run_rows, ok = [{**base, "status": "failed", "error": str(err)}], False
                print(f"[{run.dir_name}] FAILED: {err}", file=sys.stderr)
            if ok:
                drop_checkpoint(run_dir)
            last = run_rows[-1]
            print(f"[{run.dir_name}] {'done' if ok else 'FAILED'}: peak RSS {last.get('peak_rss_mib', float('nan')):.0f}"
                  f" MiB (training {last.get('train_peak_rss_mib', float('nan')):.0f}), "
                  f"{last.get('run_wall_s', float('nan')):.0f} s")
            rows.extend(run_rows)
            failures += [] if ok else [run.dir_name]
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        print(f"training {len(pending)} runs in {jobs} worker processes, {threads} thread(s) each")
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = [(run, base, pool.submit(_worker, job(run, run_dir, snapshot, base, threads)))
                       for run, run_dir, snapshot, base in pending]
            for run, base, future in futures:
                try:
                    run_rows, ok = future.result()
                except ConfigError:
                    raise
                except Exception as err:  # a worker that died (killed, out of memory) fails its run only
                    reason = f"worker died: {type(err).__name__}: {err}".splitlines()[0]
                    run_rows, ok = [{**base, "status": "failed", "error": reason}], False
                print(f"[{run.dir_name}] {'done' if ok else 'FAILED'}")
                rows.extend(run_rows)
                failures += [] if ok else [run.dir_name]
    if not main_process:
        return 1 if failures else 0
    with tables_lock(results_dir, suite.name):  # other jobs of a multirun may write the same tables now
        write_train_tables(cfg, suite, rows, results_dir)
    if suite.get("dryrun") and rows:
        from .dryrun import dryrun_row, write_dryrun_table

        last = {(r["run_id"], r["seed"]): r for r in rows}  # a run's last row: its final evaluation, or its failure
        write_dryrun_table(cfg, [dryrun_row(run, suite, last[(run.run_id, run.seed)], device, state.num_processes)
                                 for run in runs if (run.run_id, run.seed) in last])
    print(f"suite wall time this sitting: {time.perf_counter() - started:.0f} s "
          f"({len(pending)} runs trained or resumed, {finished} finished earlier, "
          f"{len(runs) - len(pending) - finished} left out)")
    if failures:
        print(f"{len(failures)} of {len(runs)} runs failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def write_train_tables(cfg: DictConfig, suite: DictConfig, rows: list[dict], results_dir: Path) -> None:
    """The runs table (one row per run and evaluation), the seeded speedup table, curves and sample figures."""
    from measure.results import write_markdown
    from measure.speedup import plot_curves, sample_figures, speedup_markdown, speedup_table

    results_file = suite.get("results_file") or f"{suite.name}_runs.csv"
    if not rows:
        print("no finished runs to write")
        return
    # a run that failed before an evaluation has no step: an empty one completes its key (a rerun replaces the row)
    rows = [r if "step" in r else {**r, "step": float("nan")} for r in rows]
    table = upsert_csv(results_dir / results_file, rows, RUN_KEY)
    print(f"wrote {results_dir / results_file} ({len(rows)} rows of {len(table)})")
    ok = table[(table.suite == suite.name) & (table.scale == cfg.scale.name) & (table.status == "ok")]
    if ok.empty or ok.step.isna().all():  # every run failed: the runs table only
        return
    if ok.method.nunique() > 1:
        stem = results_dir / f"{suite.name}_speedup"
        speed = speedup_table(ok)
        speed.insert(0, "scale", cfg.scale.name)
        upsert_csv(f"{stem}.csv", speed.to_dict("records"), ["scale", "backbone", "size", "method"])
        write_markdown(f"{stem}.md", speedup_markdown(speed), f"{suite.name} speedup ({cfg.scale.name})",
                       [f"Device: {ok.device.iloc[0]}; torch {ok.torch.iloc[0]}; seeds "
                        f"{', '.join(map(str, sorted(ok.seed.unique())))}.",
                        "Every figure is the mean over seed pairs (baseline seed s, method seed s) with the "
                        "half-width of a two-sided 95% Student-t interval (n-1 degrees of freedom).",
                        "flop_ratio: baseline / method training MACs per step; iteration_speedup: baseline / "
                        "method training seconds per step; eval loss and FID at the last step both have; "
                        "convergence speedups: baseline's steps, training FLOPs or training seconds to its final "
                        "eval loss (FID) / the method's to reach that value (linear interpolation between "
                        "evaluations; seeds that never reach it are counted in 'reached')."])
        plot_curves(ok, str(results_dir / f"{suite.name}_{cfg.scale.name}"))
    sample_figures(ok, str(results_dir / f"{suite.name}_{cfg.scale.name}"))
