"""Finished runs shared between suites: ``suite.reuse_from: [<suite>, ...]``.

An unfinished run is copied from a listed suite instead of trained again when the other run finished under that
suite's configuration as now composed (the ``config_hash`` of its rows) and both runs share their protocol
(:func:`protocol_hash`: the configuration hash without what only names or lists a suite's runs, and without the
method entry's name). The folder is copied, never moved, and its rows are rewritten as this suite's run, with a
``reused_from`` column.
Details: docs/internals.md#tread_benchenginereusepy
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from tread_bench.core.io import atomic_write_text

from .schema import SUITES_DIR
from .spec import RunSpec, config_hash, expand_runs, resolve_suite, validate_run

#: suite keys that name or list runs without changing any one run's numbers
SUITE_MEMBERSHIP = ("name", "backbones", "methods", "seeds", "jobs", "reuse_from", "results_file")
#: a run's labels: the same run may be called "tread" in one suite and "rate0.5" in another
RUN_LABELS = ("suite", "method")


def protocol_hash(snapshot: dict) -> str:
    """config_hash of a run's snapshot ({"suite", "run"}) without the suite's membership keys and the run's
    labels (its suite's name and its method entry's name): what is left decides the run's numbers."""
    suite = {k: v for k, v in snapshot["suite"].items() if k not in SUITE_MEMBERSHIP}
    run = {k: v for k, v in snapshot["run"].items() if k not in RUN_LABELS}
    return config_hash({"suite": suite, "run": run})


def _other_runs(other: str, scale: str, like: dict, data_shape, num_classes: int) -> list[tuple[RunSpec, dict]]:
    """Suite ``other``'s runs at ``scale`` that may be the run ``like`` (same backbone, size, method kind and seed),
    validated, with their snapshots, as run_suite.py would compose ``suite=<other> scale=<scale>`` (no overrides)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"suite={other}", f"scale={scale}"]
    if GlobalHydra.instance().is_initialized():  # inside run_suite.py's @hydra.main
        cfg = compose(config_name="config", overrides=overrides)
    else:  # called outside Hydra (tests, scripts)
        with initialize_config_dir(config_dir=str(SUITES_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    suite = resolve_suite(cfg)
    found = []
    for run in expand_runs(suite, cfg.scale):
        if (run.backbone, run.size, run.kind, run.seed) == (like["backbone"], like["size"], like["kind"], like["seed"]):
            validate_run(run, data_shape, num_classes)
            found.append((run, {"suite": OmegaConf.to_container(suite), "run": asdict(run)}))
    return found


def reuse_finished_run(snapshot: dict, digest: str, run_dir: Path, runs_dir: Path, sources: List[str], scale: str,
                       data_shape, num_classes: int) -> Optional[list]:
    """This run's rows, copied with its folder from the first suite of ``sources`` holding the same finished run
    under any method name (module docstring), or None (train it). ``digest``: this run's config_hash; ``run_dir``:
    its folder."""
    ours = protocol_hash(snapshot)
    for other in sources:
        if not any((Path(runs_dir) / other / scale).glob("*/result.json")):
            continue  # nothing finished there: no need to compose that suite
        for theirs_run, theirs in _other_runs(other, scale, snapshot["run"], data_shape, num_classes):
            source = Path(runs_dir) / other / scale / theirs_run.dir_name
            done_file = source / "result.json"
            if protocol_hash(theirs) != ours or not done_file.exists():
                continue
            rows = json.loads(done_file.read_text())
            if not rows or any(row.get("status") != "ok" for row in rows):
                continue
            if rows[0].get("config_hash") != config_hash(theirs):
                continue
            return _copy_run(source, run_dir, rows, snapshot["run"], digest, f"{other}/{scale}/{theirs_run.dir_name}")
    return None


def _copy_run(source: Path, run_dir: Path, rows: list, run: dict, digest: str, reused_from: str) -> list:
    """The folder ``source`` copied to ``run_dir`` (an unfinished attempt there is replaced), its rows rewritten as
    this suite's run."""
    staging = run_dir.with_name(run_dir.name + ".reuse-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    label = {"suite": run["suite"], "method": run["method"], "config_hash": digest, "reused_from": reused_from}
    reused = [{**row, **label, "run_id": RunSpec(**run).run_id} for row in rows]
    atomic_write_text(staging / "result.json", json.dumps(reused, indent=1, default=str))
    atomic_write_text(staging / "config_hash", digest)
    shutil.rmtree(run_dir, ignore_errors=True)
    staging.rename(run_dir)
    return reused
