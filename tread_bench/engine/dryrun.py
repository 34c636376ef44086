"""``scale=dryrun``: every run of a paper suite at full model size for 2 steps, each in a fresh process, and its
peak memory next to plan=true's estimate (``results/dryrun.csv`` and ``.md``).

Runs are set by suites/suite_scale/common_dryrun.yaml; a fresh process per run (tread_bench.core.processes.
run_in_fresh_process) makes its peak RSS that run's own. tread_bench.measure.memory.peak_memory takes the
measurements, :func:`write_dryrun_table` writes the table, and the final checkpoint is saved at full size, then
deleted (tread_bench.training.checkpoint.delete_checkpoint).
Details: docs/internals.md#tread_benchenginedryrunpy
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from tread_bench.core.processes import run_in_fresh_process
from tread_bench.measure.memory import peak_memory, rss_mib
from tread_bench.measure.results import environment, tables_lock, upsert_csv, write_markdown
from tread_bench.training.checkpoint import delete_checkpoint
from tread_bench.training.precision import resolve_precision

from .kinds import SUITE_KINDS

TABLE = "dryrun"   # results/dryrun.csv and .md, one row per (suite, run)


def plan_memory(run, suite: DictConfig, device: str, processes: int = 1) -> dict:
    """plan=true's memory estimate of ``run`` at the dry run's batch per process and precision (MiB)."""
    from .plan import data_shape, plan_row

    shape, num_classes = data_shape(suite)
    as_run = OmegaConf.merge(suite, {"train": {"precision": resolve_precision((suite.get("train") or {}).get("precision", "auto"), device)}})
    row = plan_row(run, as_run, shape, num_classes, processes, 0.4)
    return {"plan_mib": row["mem_total_gib"] * 1024, "plan_activations_mib": row["mem_activations_gib"] * 1024,
            "precision": row["precision"], "batch": row["batch_per_gpu"], "params": row["params"]}


def dryrun_row(run, suite: DictConfig, measured: dict, device: str, processes: int = 1) -> dict:
    """One row of results/dryrun.csv: the run, its measurements (``measured``: its last table row, or what a fresh
    process reported) and plan=true's estimate, with the estimate's error against the measured training growth."""
    plan = plan_memory(run, suite, device, processes)
    row = {"suite": run.suite, "run": run.dir_name, "backbone": run.backbone, "size": run.size, "method": run.method,
           "setting": run.setting, "params": plan["params"], "steps": measured.get("steps"),
           "batch": plan["batch"], "precision": plan["precision"], "status": measured.get("status", "failed"),
           "error": measured.get("error") or ""}
    for key in ("peak_rss_mib", "train_peak_rss_mib", "base_rss_mib", "peak_cuda_mib", "train_peak_cuda_mib"):
        row[key] = measured.get(key)
    growth = (row["train_peak_rss_mib"] - row["base_rss_mib"]
              if row["train_peak_rss_mib"] is not None and row["base_rss_mib"] is not None else None)
    row.update(train_growth_mib=growth, plan_mib=plan["plan_mib"], plan_activations_mib=plan["plan_activations_mib"],
               plan_error_pct=100 * (plan["plan_mib"] / growth - 1) if growth else None,
               run_wall_s=measured.get("run_wall_s"), train_wall_s=measured.get("wall_time_s"),
               eval_loss=measured.get("eval_loss"), fid=measured.get("fid"), fid_samples=measured.get("fid_samples"),
               **environment(device))
    if torch.device(device).type == "cuda":  # on a GPU the plan is a per-GPU figure: compare the allocator's peak
        cuda_peak = row["train_peak_cuda_mib"]
        row["plan_error_pct"] = 100 * (plan["plan_mib"] / cuda_peak - 1) if cuda_peak else None
    return row


NOTES = [
    "Each run: 2 training steps at full model size on synthetic class-conditional images of the latents' shape "
    "(4x32x32, 1000 classes), then the final evaluation on a handful of samples (held-out loss; FID through a "
    "random-weight SD-VAE decode and the offline Inception: exercises the path, the values mean nothing), then the "
    "final checkpoint (written, then deleted). Every run in a fresh process.",
    "peak_rss_mib: the process's peak RSS over the whole run (VmHWM); train_peak_rss_mib: at the start of the final "
    "evaluation (training only); base_rss_mib: before the network was built (interpreter, torch, data); "
    "train_growth_mib = train peak - base. plan_mib: plan=true's estimate for the same run at this batch and "
    "precision (tread_bench/measure/cost.py: 20 bytes/parameter + activations); plan_error_pct = plan / train growth - 1 "
    "(on CUDA: plan / the allocator's training peak - 1).",
]


def write_dryrun_table(cfg: DictConfig, rows: list) -> pd.DataFrame:
    """Upsert ``rows`` (dryrun_row) into results/dryrun.csv and rewrite results/dryrun.md from the whole table."""
    results_dir = Path(cfg.results_dir)
    with tables_lock(results_dir, TABLE):
        table = upsert_csv(results_dir / f"{TABLE}.csv", rows, ["suite", "run"])
        show = table[["suite", "run", "setting", "params", "batch", "precision", "status", "peak_rss_mib",
                      "train_peak_rss_mib", "train_growth_mib", "plan_mib", "plan_error_pct", "run_wall_s",
                      "train_wall_s"]].copy()
        show["params"] = (show["params"] / 1e6).round(1).astype(str) + "M"
        for column in ("peak_rss_mib", "train_peak_rss_mib", "train_growth_mib", "plan_mib"):  # whole MiB
            show[column] = pd.to_numeric(show[column]).round().astype("Int64")  # None (not measured) -> <NA>
        for column in ("plan_error_pct", "run_wall_s", "train_wall_s"):
            show[column] = pd.to_numeric(show[column]).round(1)
        write_markdown(results_dir / f"{TABLE}.md", show, "Dry run (scale=dryrun): every paper suite at full size",
                       NOTES + [f"Measured on {table.device.iloc[-1]}, torch {table.torch.iloc[-1]}."])
    return table


def _suite_in_process(cfg_container: dict, threads: int, kind: str, kind_module: str, device: str) -> dict:
    """A whole suite kind in this (fresh) process: its exit code, the measurements and the wall time."""
    import importlib

    from .imports import import_user_modules

    torch.set_num_threads(threads)
    import_user_modules(cfg_container.get("imports"))
    importlib.import_module(kind_module)  # registers the kind in this process
    cfg = OmegaConf.create(cfg_container)
    base, started = rss_mib(), time.perf_counter()
    code = SUITE_KINDS[kind].run(cfg, OmegaConf.create(OmegaConf.to_container(cfg.suite, resolve=True)))
    return {"code": code, "base_rss_mib": base, **peak_memory(device), "run_wall_s": time.perf_counter() - started}


def run_isolated_suite(cfg: DictConfig, suite: DictConfig) -> int:
    """A suite kind other than train (guidance: its runs trained, then sampled) run whole in a fresh process; its
    runs' rows in results/dryrun.csv carry that process's peak (no separate training peak: the kind's own code
    trains and evaluates in one call; with several runs the peak is the largest of them)."""
    from .plan import data_shape
    from .spec import pick_device, prepare_runs

    started = time.perf_counter()
    device = pick_device(cfg.device)
    kind = suite.get("kind", "train")
    shape, num_classes = data_shape(suite)
    runs = prepare_runs(cfg, suite, shape, num_classes)  # guidance: every method entry is trained once, then sampled
    threads = max(1, os.cpu_count() or 1)
    print(f"dry run of suite {suite.name} ({kind}): in a fresh process, {threads} thread(s)")
    try:
        measured = run_in_fresh_process(_suite_in_process, OmegaConf.to_container(cfg, resolve=True), threads,
                                        kind, SUITE_KINDS[kind].module, device)
        status = "ok" if measured["code"] == 0 else "failed"
        measured.update(status=status, error="" if status == "ok" else f"suite exited with code {measured['code']}")
    except RuntimeError as err:
        measured, status = {"status": "failed", "error": str(err)}, "failed"
    if status == "ok":
        for folder in (Path(cfg.runs_dir) / suite.name / cfg.scale.name).glob("*"):
            delete_checkpoint(folder)
    steps = suite.train.steps if status == "ok" else None
    rows = [dryrun_row(run, suite, {**measured, "steps": steps}, device) for run in runs]
    write_dryrun_table(cfg, rows)
    for row in rows:
        print(f"[{row['run']}] dry run {row['status']}: peak RSS {row.get('peak_rss_mib') or float('nan'):.0f} MiB, "
              f"{row.get('run_wall_s') or float('nan'):.0f} s{'; ' + row['error'] if row['error'] else ''}")
    print(f"suite wall time this sitting: {time.perf_counter() - started:.0f} s")
    return 0 if status == "ok" else 1
