"""A run's lifecycle, for every suite kind that trains (train, guidance): the suite's runs sorted into finished
and pending, each pending run's folder locked and prepared (``collect_runs``); pending runs trained (or resumed)
and evaluated into table rows, in this process, in ``suite.jobs`` worker processes or each in a fresh process
(``train_pending``); a finished run's EMA model read back (``trained_ema``). The training loop itself is
tread_bench/training/trainer.py; the suite kinds are tread_bench/kinds/."""
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

from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write_text
from tread_bench.core.processes import Stopped, die_with_parent, end_children, spawning_children
from tread_bench.measure.memory import rss_mib

from .resume import STATE_FILES, RunBusy, prepare_run_dir, run_lock
from .spec import RunSpec, build_run_network, config_hash, load_suite_data, run_stages
from .tracking import open_tracker

# evaluation columns logged to the tracker (with every eval_loss* column)
EVAL_METRICS = ("fid", "kid", "precision", "recall")


def fid_reference(suite: DictConfig, eval_cfg):
    """(reference, name): an npz of statistics, or the images of the suite's reference split."""
    from tread_bench.data import load_dataset

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
    """The fixed held-out evaluation loss of tread_bench/measure/eval_loss.py, or None when turned off."""
    from tread_bench.data import load_dataset
    from tread_bench.measure.eval_loss import EvalLossConfig, HeldOutLoss

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

    At every evaluation point (suite.eval.every, run.eval_at and the final step), off the training clock: the held-out
    evaluation loss of the EMA model, a sample grid (same noise and labels for every run and point), and
    FID (at every point, or only the final one with eval.fid_at=final). ``tracker`` (tensorboard, wandb or
    none; tread_bench/engine/tracking.py) logs the training curve, the evaluations and the grids as they happen.
    ``memory`` (a dict; dry runs) gets the process's peak memory at the start of the final evaluation: training's.
    """
    from diffusion.sampler import SamplerConfig
    from tread_bench.training.trainer import Trainer, TrainConfig
    from tread_bench.measure.evaluate import EvalConfig, FIDEvaluator, decode_latents
    from tread_bench.measure.flops import train_macs_per_stage
    from tread_bench.methods import cumulative_cost, stage_starts
    from tread_bench.measure.samples import sample_grid, save_grid
    from diffusion import build_objective

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
    with torch.device("meta"):
        meta_net = build_run_network(run, data.shape, data.num_classes)
    stage_macs = train_macs_per_stage(meta_net, trainer.stages, data.shape, data.num_classes)  # per image
    starts = stage_starts(trainer.stages)
    # FID samples under the run's precision rule (bf16 autocast on CUDA by default, fp32 on the CPU)
    fid = (FIDEvaluator(eval_cfg, *fid_reference(suite, eval_cfg), data.num_classes, objective,
                        precision=train_cfg.precision) if eval_cfg.samples > 0 else None)
    loss = held_out_loss(suite, eval_cfg, data, objective)
    grid_sampler = SamplerConfig(steps=eval_cfg.sampler_steps)
    decode = (lambda z: decode_latents(z, eval_cfg.vae, eval_cfg.latent_scaling, eval_cfg.vae_batch, device)
              ) if eval_cfg.vae else None

    def on_eval(tr):
        recent = [s["loss"] for s in tr.stats[-3:]] or [float("nan")]
        row = {"step": tr.step, "images_seen": tr.images_seen, "wall_time_s": tr.elapsed,
               "train_flops": cumulative_cost(tr.step, starts, stage_macs, units_per_step=tr.cfg.global_batch),
               "loss": sum(recent) / len(recent)}
        final = tr.step >= tr.cfg.steps
        if memory is not None and final:
            from tread_bench.measure.memory import peak_memory

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
        if fid is not None and (final or eval_cfg.fid_at == "every"):  # every process samples its share
            row.update(fid(tr.ema_denoiser, data.shape, tr.acc.device))
        tr.evals.append(row)
        if tr.tracker is not None:
            tr.tracker.log({f"eval/{k}": v for k, v in row.items() if k.startswith("eval_loss") or k in EVAL_METRICS},
                           tr.step)

    try:
        summary = trainer.train(on_eval=on_eval, eval_every=eval_cfg.every, eval_at=run.eval_at)
    finally:
        if trainer.tracker is not None:
            trainer.tracker.finish()
    summary.update(resumed=resumed, params=sum(p.numel() for p in den.net.parameters()))
    return summary, trainer


def collect_runs(cfg: DictConfig, suite: DictConfig, runs: list, resolved: dict, device: str, data,
                 main_process: bool = True, single_process: bool = True,
                 extra_state: tuple = ()) -> tuple[list[dict], list, list]:
    """Sort a suite's runs before anything trains: (rows of the runs finished earlier or copied from
    ``suite.reuse_from``, pending [(run, run_dir, snapshot, base row)] to train with ``train_pending``, finished
    [(run, run_dir)]). A pending run's folder is locked and prepared: its checkpoint resumes only under the same
    configuration, else its state files and ``extra_state`` (a kind's own files about the trained model) go. Under
    ``report=true`` nothing is touched and unfinished runs are left out. Runs are copied only by a
    ``single_process`` suite: under ``accelerate launch`` every rank would have to agree on the copy."""
    from .reuse import reuse_finished_run
    from tread_bench.measure.results import environment

    runs_root = Path(cfg.runs_dir) / suite.name / cfg.scale.name
    rows, pending, finished = [], [], []
    for run in runs:
        run_dir = runs_root / run.dir_name
        snapshot = {"suite": resolved, "run": asdict(run)}
        digest = config_hash(snapshot)
        done = None if cfg.force else finished_rows(run_dir, digest)
        if done is not None:
            print(f"[{run.dir_name}] finished earlier, skipped (force=true reruns it)")
            rows.extend({**row, "setting": run.setting} for row in done)  # as this code describes the method
            finished.append((run, run_dir))
            continue
        if not cfg.force and not cfg.get("report") and suite.get("reuse_from") and single_process:
            reused = reuse_finished_run(snapshot, digest, run_dir, Path(cfg.runs_dir), list(suite.reuse_from),
                                        cfg.scale.name, data.shape, data.num_classes)
            if reused:
                print(f"[{run.dir_name}] the same run finished in {reused[0]['reused_from']}: copied, not trained")
                rows.extend({**row, "setting": run.setting} for row in reused)
                finished.append((run, run_dir))
                continue
        if cfg.get("report"):  # tables from finished runs only: touch nothing of an unfinished run
            print(f"[{run.dir_name}] not finished ({progress_of(run_dir, suite)}), left out of the report")
            continue
        try:  # never resume another configuration, never clear a folder another process is training
            with run_lock(run_dir, enabled=main_process):
                prepare_run_dir(run_dir, digest, cfg.force, (*STATE_FILES, *extra_state), write=main_process)
        except RunBusy as busy:
            print(f"[{run.dir_name}] skipped: the run folder is {busy}; its rows land when it finishes")
            continue
        base = {"suite": run.suite, "scale": run.scale, "run_id": run.run_id, "backbone": run.backbone,
                "size": run.size, "method": run.method, "setting": run.setting, "selection": run.selection,
                "seed": run.seed, **environment(device), "config_hash": digest}
        pending.append((run, run_dir, snapshot, base))
    return rows, pending, finished


def progress_of(run_dir: Path, suite: DictConfig) -> str:
    """How far an unfinished run got: its last logged step of the suite's steps, or that it has not started."""
    stats = Path(run_dir) / "stats.jsonl"
    lines = stats.read_text().splitlines() if stats.exists() else []
    if not lines:
        return "not started"
    return f"step {json.loads(lines[-1])['step']} of {suite.train.steps} logged"


def trained_ema(run: RunSpec, suite: DictConfig, data, run_dir: Path):
    """(EMA denoiser, objective) of a finished run, read from its final checkpoint into the network the run was
    built as: the model its evaluations sampled (in eval mode a method runs every token, so a fine-tune stage's
    settings do not change it)."""
    from diffusion import build_objective
    from tread_bench.training.checkpoint import find_checkpoint, load_ema
    from tread_bench.training.trainer import TrainConfig

    train_cfg = TrainConfig(**OmegaConf.to_container(suite.train), seed=run.seed)
    objective = build_objective(**run.objective)
    den = objective.wrap(build_run_network(run, data.shape, data.num_classes, seed=train_cfg.seed + 1,
                                           fp32_after_route=train_cfg.fp32_after_route))
    path = find_checkpoint(run_dir)
    ema, step = load_ema(path, den) if path is not None else (None, 0)
    if step < train_cfg.steps:
        raise ConfigError(f"[{run.dir_name}] has no final checkpoint in {run_dir} (step {step} of "
                          f"{train_cfg.steps}); rerun the suite with force=true to train it again")
    ema.eval()
    return ema, objective


def finished_rows(run_dir: Path, digest: str) -> list[dict] | None:
    """The rows of the run's ``result.json`` when it finished under configuration ``digest``, else None."""
    done_file = Path(run_dir) / "result.json"
    if not done_file.exists():
        return None
    done = json.loads(done_file.read_text())
    if done and done[0].get("config_hash") == digest and done[0].get("status") == "ok":
        return done
    return None


def train_and_record(run: RunSpec, suite: DictConfig, data, run_dir: Path, device: str, snapshot: dict,
                      base: dict, tracker: str = "none", memory: dict | None = None) -> tuple[list[dict], bool]:
    """Train one run, holding its folder (tread_bench.engine.resume.run_lock), and write its rows to its
    ``result.json``; a failure becomes one 'failed' row (never an exception). A run another process holds is
    left to it: no rows. One finished by another process meanwhile: its rows, not trained again."""
    from accelerate import PartialState

    main_process = PartialState().is_main_process
    try:
        with run_lock(run_dir, enabled=main_process):
            rows = finished_rows(run_dir, base.get("config_hash")) if main_process else None
            if rows is not None:
                print(f"[{run.dir_name}] finished by another process meanwhile, not trained again")
                return rows, True
            rows, ok = _train_rows(run, suite, data, run_dir, device, snapshot, base, tracker, memory)
            if main_process:
                atomic_write_text(Path(run_dir) / "result.json", json.dumps(rows, indent=1, default=str))
            return rows, ok
    except RunBusy as busy:
        print(f"[{run.dir_name}] skipped: the run folder is {busy}; its rows land when it finishes")
        return [], True


def _train_rows(run, suite, data, run_dir, device, snapshot, base, tracker, memory) -> tuple[list[dict], bool]:
    try:
        summary, trainer = train_one(run, suite, data, run_dir, device, snapshot, tracker, memory)
        base = {**base, "params": summary["params"], "steps": summary["steps"], "final_loss": summary["final_loss"],
                "samples_per_s": summary["samples_per_s"], "tf32": trainer.tf32,
                "compiled_blocks": trainer.compiled_blocks, "status": "ok", "error": ""}
        return [{**base, **e} for e in trainer.evals], True
    except ConfigError:
        raise
    except Exception as err:  # one failed run must not stop the suite or touch other runs' files
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        print(f"[{run.dir_name}] FAILED: {reason}", file=sys.stderr)
        if type(err).__name__ not in ("TrainingDiverged", "CheckpointError"):  # these explain themselves in one line
            traceback.print_exc(file=sys.stderr)
        return [{**base, "status": "failed", "error": reason}], False


def _start_worker(parent_pid: int) -> None:
    """A pool worker's initializer: it dies with the suite's process, even by kill -9."""
    die_with_parent(parent_pid)


def _worker(job: dict) -> tuple[list[dict], bool]:
    """One run in a worker process (suite.jobs > 1, or a fresh process per run in a dry run): its own threads,
    modules, data and files. In a dry run its rows carry the process's memory (tread_bench/engine/dryrun.py)."""
    from tread_bench.engine.imports import import_user_modules

    torch.set_num_threads(job["threads"])
    import_user_modules(job["imports"])
    suite = OmegaConf.create(job["suite"])
    data = load_suite_data(suite)
    memory = {} if job.get("dryrun") else None
    base_rss, started = rss_mib(), time.perf_counter()  # before the network is built: interpreter, torch, data
    rows, ok = train_and_record(job["run"], suite, data, Path(job["run_dir"]), job["device"], job["snapshot"],
                                 job["base"], job["tracker"], memory)
    if memory is not None and rows:  # this process ran this one run: its peak is the run's
        from tread_bench.measure.memory import peak_memory

        measured = {"base_rss_mib": base_rss, **memory, **peak_memory(job["device"]),
                    "run_wall_s": time.perf_counter() - started}
        rows = [{**row, **measured} for row in rows]
        atomic_write_text(Path(job["run_dir"]) / "result.json", json.dumps(rows, indent=1, default=str))
    return rows, ok


class Progress:
    """Suite-level progress: as each run finishes, how many of N have, and the time left at the pace so far (an
    estimate: runs differ in cost, and parallel workers finish in bursts)."""

    def __init__(self, total: int):
        self.total, self.finished, self.started = total, 0, time.perf_counter()

    def done(self, name: str, ok: bool) -> None:
        self.finished += 1
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.finished * (self.total - self.finished)
        print(f"[{name}] {'done' if ok else 'FAILED'}: {self.finished} of {self.total} runs finished, "
              f"{_duration(elapsed)} so far" + (f", about {_duration(left)} left" if self.finished < self.total else ""),
              flush=True)


def _duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{int(seconds)} s" if seconds < 90 else (f"{minutes} min" if minutes < 90 else
                                                      f"{minutes // 60} h {minutes % 60:02d} min")


def train_pending(pending: list, cfg: DictConfig, suite: DictConfig, data, device: str, resolved: dict,
                  fid_prepare=None) -> tuple[list[dict], list[str]]:
    """Train ``pending`` [(run, run_dir, snapshot, base row)] one of three ways: in this process one after
    another, in ``suite.jobs`` spawned worker processes (CPU), or each in a fresh process (scale=dryrun: a run's
    peak memory is its process's). Returns (rows, names of the runs that failed); a run's failure never stops
    the others. ``fid_prepare``: computes the FID reference statistics once, before any worker needs them."""
    from accelerate import PartialState

    state = PartialState()
    main_process = state.is_main_process
    rows, failures = [], []
    tracker = cfg.get("tracker", "none")
    jobs = suite.get("jobs", 1)
    if state.num_processes > 1 or device == "cuda":
        jobs = 1  # parallel runs are for CPU machines; GPUs and data-parallel runs take one run at a time
    jobs = min(jobs, max(len(pending), 1))
    if fid_prepare is not None and pending and main_process:
        fid_prepare()  # once, not once per worker
    # a dry run trains each run in a fresh process (its peak memory is the run's); not under accelerate launch,
    # whose processes train every run together
    dryrun = bool(suite.get("dryrun")) and state.num_processes == 1

    def job(run, run_dir, snapshot, base, threads):
        return {"run": run, "suite": resolved, "run_dir": str(run_dir), "device": device, "snapshot": snapshot,
                "base": base, "threads": threads, "imports": list(cfg.get("imports") or []), "tracker": tracker,
                "dryrun": dryrun}

    progress = Progress(len(pending))
    if jobs == 1 and not dryrun:
        for k, (run, run_dir, snapshot, base) in enumerate(pending, 1):
            print(f"[{run.dir_name}] run {k} of {len(pending)}: {run.method}: {run.setting}, selection {run.selection}")
            run_rows, ok = train_and_record(run, suite, data, run_dir, device, snapshot, base, tracker)
            if run_rows and main_process:
                progress.done(run.dir_name, ok)
            rows.extend(run_rows)
            failures += [] if ok else [run.dir_name]
    elif dryrun:  # one run at a time (suite.jobs is not read): the machine's memory is for one full-size run
        from tread_bench.core.processes import run_in_fresh_process
        from tread_bench.training.checkpoint import delete_checkpoint

        threads = max(1, os.cpu_count() or 1)
        print(f"dry run: {len(pending)} runs, one at a time, each in a fresh process with {threads} thread(s)")
        for run, run_dir, snapshot, base in pending:
            print(f"[{run.dir_name}] {run.method}: {run.setting}, selection {run.selection}")
            try:
                run_rows, ok = run_in_fresh_process(_worker, job(run, run_dir, snapshot, base, threads))
            except RuntimeError as err:  # the process died (e.g. out of memory): this run fails, the next one runs
                run_rows, ok = [{**base, "status": "failed", "error": str(err)}], False
                print(f"[{run.dir_name}] FAILED: {err}", file=sys.stderr)
            if not run_rows:  # held by another process
                continue
            if ok:
                delete_checkpoint(run_dir)
            last = run_rows[-1]
            print(f"[{run.dir_name}] {'done' if ok else 'FAILED'}: peak RSS {last.get('peak_rss_mib', float('nan')):.0f}"
                  f" MiB (training {last.get('train_peak_rss_mib', float('nan')):.0f}), "
                  f"{last.get('run_wall_s', float('nan')):.0f} s")
            rows.extend(run_rows)
            failures += [] if ok else [run.dir_name]
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        print(f"training {len(pending)} runs in {jobs} worker processes, {threads} thread(s) each")

        def done(k, result, err):
            run, _, _, base = pending[k]
            if err is not None:  # a worker that died (killed, out of memory) fails its run only
                reason = f"worker died: {type(err).__name__}: {err}".splitlines()[0]
                result = [{**base, "status": "failed", "error": reason}], False
            run_rows, ok = result
            if run_rows:
                progress.done(run.dir_name, ok)
            rows.extend(run_rows)
            failures.extend([] if ok else [run.dir_name])

        run_in_workers(_worker, [job(run, run_dir, snapshot, base, threads)
                                 for run, run_dir, snapshot, base in pending], jobs, done)
    return rows, failures


def run_in_workers(fn, jobs: list, workers: int, done) -> None:
    """``fn(job)`` for every job in ``workers`` spawned processes; ``done(k, result, error)`` as each job's result
    arrives, in submission order (``error`` an exception other than ConfigError, which stops the suite). The
    workers are born ignoring SIGINT and die with this process; a stop ends every one of them, reported or still
    starting up (tread_bench/core/processes.py)."""
    pool, stopping = None, False
    try:
        with spawning_children():  # the workers start here, at submit; a signal meanwhile waits for the end
            pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                                       initargs=(os.getpid(),))
            futures = [pool.submit(fn, job) for job in jobs]
        for k, future in enumerate(futures):
            try:
                result, error = future.result(), None
            except ConfigError:
                raise
            except Exception as err:
                result, error = None, err
            done(k, result, error)
    except Stopped:
        stopping = True
        end_children()  # every worker, reported or still starting up: its last checkpoint is consistent
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=not stopping, cancel_futures=True)
