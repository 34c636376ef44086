"""Run a benchmark suite: ``python run_suite.py suite=<name> [scale=tiny] [force=true] [imports=[my_pkg.mod]]``;
``plan=true`` prints what a training suite would cost (FLOPs, GPU-hours, memory per GPU) and trains nothing.

A suite (suites/suite/*.yaml) is configuration only: data, schedule, the backbones and the methods
(route sets) to cross. tread_bench/engine/ checks it against its schema (tread_bench/engine/schema.py), expands it into runs,
validates every run before any training (bad input gets one line naming the fix), then trains each
run, skipping runs that already finished and resuming interrupted ones from their checkpoint, and
writes the suite's result tables.
"""
from __future__ import annotations

import shlex
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd
from omegaconf import DictConfig

from tread_bench.core.errors import ConfigError
from tread_bench.core.processes import Stopped, stop_on_signals
from tread_bench.engine import apply_auto_scale, import_user_modules, resolve_suite, run_plan, run_suite_kind, validate_suite


@hydra.main(config_path="suites", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Errors are reported here, inside the task: Hydra would print a traceback, and it drops the return value.
    try:
        with stop_on_signals():
            code = run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:  # checkpoints and tables are written atomically: what was saved resumes
        command = shlex.join(["python", *sys.argv])
        print(f"stopped by {stop}: finished runs and checkpoints are kept; resume with: {command}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    if code:
        sys.exit(code)


def run(cfg: DictConfig) -> int:
    """The suite's exit code; ConfigError for bad input (before anything is written), Stopped on a signal."""
    # In the task, not at the top: a launcher that runs the task in a process of its own (submitit) unpickles
    # this function without running this file's imports.
    import tread_bench.kinds  # noqa: F401  (registers the built-in suite kinds)

    # First: the modules they name register backbones that the suite may list.
    import_user_modules(cfg.get("imports"), cwd=get_original_cwd())
    # scale=auto (the default): full scale when the suite's data is configured, else the CPU scale
    cfg = apply_auto_scale(cfg, HydraConfig.get().overrides.task, hydra.compose)
    validate_suite(cfg)  # unknown keys, wrong types, impossible values: before anything is written
    suite = resolve_suite(cfg)
    if cfg.get("plan"):
        return run_plan(cfg, suite)  # costs only: no run folders, no training
    return run_suite_kind(cfg, suite)  # scale=dryrun: runs in fresh processes (tread_bench/engine/dryrun.py)


if __name__ == "__main__":
    # Hydra reports an unknown key or suite in several lines and exits 1; say it in one line, exit 2.
    from pathlib import Path

    from tread_bench.engine.schema import check_command_line

    if any(a in ("--help", "-h") for a in sys.argv[1:]):  # ours, not Hydra's page of its internal config groups
        from tread_bench.engine.cli_help import help_text

        print(help_text(Path(__file__).resolve().parent / "suites"))
        sys.exit(0)
    problem = check_command_line(sys.argv[1:], str(Path(__file__).resolve().parent / "suites"))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
