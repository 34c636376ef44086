"""The train kind: every run trained (or resumed) and evaluated, finished runs skipped or copied from another suite
(``reuse_from``), and the suite's tables written: the runs table, the seeded speedup table, curves and samples."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf

from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write_text
from tread_bench.engine.kinds import register_suite_kind
from tread_bench.engine.schema import SUITES_DIR, group_options, suggest
from tread_bench.engine.spec import load_suite_data, pick_device, prepare_runs
from tread_bench.engine.tables import committed_training_time, runs_table_name
from tread_bench.engine.lifecycle import collect_runs, fid_reference, train_pending
from tread_bench.measure.results import read_table, tables_lock, upsert_csv

# A run's rows (one per evaluation) are replaced together: a rerun never leaves rows of an earlier attempt.
RUN_KEY = ["suite", "scale", "run_id", "seed"]


@dataclass
class TrainKeys:
    reuse_from: Optional[List[str]] = None   # suites whose identical finished runs are copied (tread_bench/engine/reuse.py)
    crossover_tables: Optional[List[str]] = None  # runs tables (in results_dir) the crossover map combines


def check_train_suite(suite: dict) -> None:
    for other in suite.get("reuse_from") or []:
        known_suites = group_options(SUITES_DIR, "suite")
        if other not in known_suites:
            raise ConfigError(f"suite.reuse_from: unknown suite '{other}'; {suggest(str(other), known_suites)}"
                              f"choose from {', '.join(known_suites)}")


def join_submitit_tasks() -> None:
    """Make each task of a submitit job of several tasks (hydra/launcher=slurm with gpus_per_node or nodes > 1,
    or the local launcher's tasks_per_node) one data-parallel process: export its RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR (the job's first node) and MASTER_PORT, which accelerate reads and SLURM's variables do not give it.
    Nothing happens outside such a job or when a launcher (accelerate launch, torchrun) has set RANK already."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "RANK" in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        # GPUs stay as SLURM shows them: accelerate takes GPU LOCAL_RANK % visible GPUs, right whether each task
        # sees the node's GPUs or only its own; overwrite keeps a MASTER_PORT set in the job's environment
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


@register_suite_kind("train", keys=TrainKeys, check=check_train_suite, trains=True, isolates_dryrun_runs=True)
def run_train_suite(cfg: DictConfig, suite: DictConfig) -> int:
    from tread_bench.measure.evaluate import EvalConfig, FIDEvaluator

    from accelerate import PartialState

    started = time.perf_counter()
    device = pick_device(cfg.device)
    join_submitit_tasks()  # before the first PartialState: it joins the process group once, from the environment
    state = PartialState(cpu=device != "cuda")  # cpu: several processes on CPU join by gloo
    main_process = state.is_main_process  # with several processes, only rank 0 writes files
    if state.num_processes > 1:
        print(f"data parallel: process {state.process_index} of {state.num_processes} ({state.backend}, "
              f"{state.device}), {suite.train.global_batch // state.num_processes} images of each global batch")
    data = load_suite_data(suite)
    runs = prepare_runs(cfg, suite, data.shape, data.num_classes, only=True)  # all checked before the first trains
    eval_cfg = EvalConfig(**OmegaConf.to_container(suite.get("eval") or {}))
    fid_ref = fid_reference(suite, eval_cfg) if eval_cfg.samples > 0 else None  # checked before training
    results_dir, runs_root = Path(cfg.results_dir), Path(cfg.runs_dir) / suite.name / cfg.scale.name
    read_table(results_dir / runs_table_name(suite), RUN_KEY)  # readable, before training
    resolved = OmegaConf.to_container(suite, resolve=True)
    if main_process:
        results_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results_dir / f"{suite.name}_{cfg.scale.name}_config.yaml", OmegaConf.to_yaml(suite))
    rows, pending, finished = collect_runs(cfg, suite, runs, resolved, device, data, main_process,
                                           single_process=state.num_processes == 1)
    if cfg.get("report") and main_process:
        report_units(cfg, suite, runs, results_dir)
        if not rows:
            write_crossover_report(suite, results_dir)
    if main_process and pending:
        announce(cfg, suite, [p[0] for p in pending], len(finished), results_dir, runs_root)
    fid_prepare = (lambda: FIDEvaluator(eval_cfg, *fid_ref, data.num_classes).prepare_reference()) if fid_ref else None
    trained, failures = train_pending(pending, cfg, suite, data, device, resolved, fid_prepare)
    rows.extend(trained)
    if not main_process:
        return 1 if failures else 0
    with tables_lock(results_dir, suite.name):  # other jobs of a multirun may write the same tables now
        write_train_tables(cfg, suite, rows, results_dir)
    if suite.get("dryrun") and rows:
        from tread_bench.engine.dryrun import dryrun_row, write_dryrun_table

        last = {(r["run_id"], r["seed"]): r for r in rows}  # a run's last row: its final evaluation, or its failure
        write_dryrun_table(cfg, [dryrun_row(run, suite, last[(run.run_id, run.seed)], device, state.num_processes)
                                 for run in runs if (run.run_id, run.seed) in last])
    print(f"suite wall time this sitting: {time.perf_counter() - started:.0f} s "
          f"({len(pending)} runs trained or resumed, {len(finished)} finished earlier, "
          f"{len(runs) - len(pending) - len(finished)} left out)")
    if failures:
        print(f"{len(failures)} of {len(runs)} runs failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def announce(cfg: DictConfig, suite: DictConfig, pending: list, finished: int, results_dir: Path,
             runs_root: Path) -> None:
    """What this sitting will do, before it trains: the runs, an estimate of the wall time, the files it writes."""
    jobs = min(suite.get("jobs", 1), len(pending))
    print(f"{suite.name} ({cfg.scale.name}): {len(pending)} runs to train, {jobs} at a time"
          + (f" ({finished} finished earlier)" if finished else ""))
    estimate = committed_training_time(suite, cfg.scale.name, pending)
    if estimate is None:
        print("  estimated time: no estimate (the committed tables hold no run of this configuration: same run, "
              "steps, batch and data)")
    else:
        seconds, device, found = estimate
        print(f"  estimated time: about {max(1, round(seconds / jobs / 60))} min of training for the {found} of them "
              f"the committed reference tables hold (their measured training time on {device}, {jobs} at a time; "
              "evaluations come on top, and another machine or load differs)")
    stem = f"{suite.name}_{cfg.scale.name}"
    print(f"  writes: {results_dir / runs_table_name(suite)}, "
          f"{results_dir / f'{suite.name}_speedup.csv'} and .md, figures {results_dir / stem}_*.png; "
          f"run folders under {runs_root}")


def write_train_tables(cfg: DictConfig, suite: DictConfig, rows: list[dict], results_dir: Path) -> None:
    """The runs table (one row per run and evaluation), the seeded speedup table, curves and sample figures."""
    from tread_bench.measure.results import write_markdown
    from tread_bench.measure.speedup import plot_curves, sample_figures, speedup_markdown, speedup_table

    results_file = runs_table_name(suite)
    if rows:
        # a run that failed before an evaluation has no step: an empty one completes its key (a rerun replaces it)
        rows = [r if "step" in r else {**r, "step": float("nan")} for r in rows]
        table = upsert_csv(results_dir / results_file, rows, RUN_KEY)
        print(f"wrote {results_dir / results_file} ({len(rows)} rows of {len(table)})")
    else:  # report=true without run folders: the tables from the rows the runs table holds (units run elsewhere)
        table = read_table(results_dir / results_file, RUN_KEY) if cfg.get("report") else None
        if table is None or "step" not in table:
            print("no finished runs to write")
            return
        print(f"tables from the rows of {results_dir / results_file}")
    ok = table[(table.suite == suite.name) & (table.scale == cfg.scale.name) & (table.status == "ok")]
    if ok.empty or ok.step.isna().all():  # every run failed: the runs table only
        return
    if ok.method.nunique() > 1:
        stem = results_dir / f"{suite.name}_speedup"
        speed = speedup_table(ok)
        speed.insert(0, "scale", cfg.scale.name)
        upsert_csv(f"{stem}.csv", speed.to_dict("records"), ["scale", "backbone", "size", "method"],
                   replace_where={"scale": cfg.scale.name})  # the scale's rows recomputed whole
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
        d = suite.data
        shared = suite.get("jobs", 1) > 1  # parallel runs happen on CPU only (train_pending)
        plot_curves(ok, str(results_dir / f"{suite.name}_{cfg.scale.name}"),
                    dataset=f"{d.get('name', 'data')} {d.resolution}x{d.resolution}",
                    time_note=f"({suite.jobs} runs at a time shared the CPU: times under load)" if shared else "")
    sample_figures(ok, str(results_dir / f"{suite.name}_{cfg.scale.name}"))
    write_crossover_report(suite, results_dir)


def write_crossover_report(suite: DictConfig, results_dir: Path) -> None:
    """The crossover map's cells table, trend and figure from the runs tables ``suite.crossover_tables`` names."""
    if not suite.get("crossover_tables"):
        return
    from tread_bench.measure.crossover import write_report

    tables = [results_dir / name for name in suite.crossover_tables]
    if not any(t.exists() for t in tables):
        print(f"no crossover runs table in {results_dir} yet: no map")
        return
    for path in write_report(tables, results_dir,
                             float(suite.train.ema_decay)):
        print(f"wrote {path}")


def report_units(cfg: DictConfig, suite: DictConfig, runs: list, results_dir: Path) -> None:
    """report=true: each unit of work (one backbone entry and seed: its methods' runs, a seed pair) as done or
    missing in the suite's runs table, with the command that trains a missing one (its one missing run alone, when
    that is all it lacks)."""
    table = read_table(results_dir / runs_table_name(suite), RUN_KEY)
    done = set()
    if table is not None and "step" in table:
        ok = table[(table.suite == suite.name) & (table.scale == cfg.scale.name) & (table.status == "ok")]
        last = ok.groupby(["run_id", "seed"]).step.max()
        done = {key for key, step in last.items() if step >= suite.train.steps}
    units: dict = {}
    for run in runs:
        units.setdefault((f"{run.backbone}-{run.size.replace('/', '')}-", run.seed), []).append(run)
    missing_units = 0
    print(f"units of work of suite {suite.name} (a backbone entry and a seed, every method), by "
          f"{results_dir / runs_table_name(suite)}:")
    for (prefix, seed), members in units.items():
        missing = [r for r in members if (r.run_id, r.seed) not in done]
        if not missing:
            print(f"  done     {prefix}seed{seed}")
            continue
        missing_units += 1
        # one run missing: name it alone (the finished one's folder may be gone, and only= would train it again),
        # unless its name is also part of another run's, which only= would then train as well
        only = prefix
        if len(missing) == 1 and not any(missing[0].run_id in r.run_id for r in runs if r.run_id != missing[0].run_id):
            only = missing[0].run_id
        print(f"  missing  {prefix}seed{seed} ({', '.join(r.method for r in missing)}): python run_suite.py "
              f"suite={suite.name} scale={cfg.scale.name} only={only} 'suite.seeds=[{seed}]' "
              f"results_dir={cfg.results_dir}")
    print(f"{len(units) - missing_units} of {len(units)} units done")
