"""Finished runs shared between suites: ``suite.reuse_from: [<suite>, ...]``.

An unfinished run is copied from a listed suite instead of trained again when the other run finished under that
suite's configuration as now composed (the ``config_hash`` of its rows) and both runs share their protocol
(:func:`protocol_hash`: the configuration hash without what only names or lists a suite's runs). The folder is
copied, never moved, and its rows are rewritten as this suite's, with a ``reused_from`` column.
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
from .spec import config_hash, expand_runs, resolve_suite, validate_run

#: suite keys that name or list runs without changing any one run's numbers
SUITE_MEMBERSHIP = ("name", "backbones", "methods", "seeds", "jobs", "reuse_from", "results_file")


def protocol_hash(snapshot: dict) -> str:
    """config_hash of a run's snapshot ({"suite", "run"}) without the suite's membership keys and the run's
    suite name."""
    suite = {k: v for k, v in snapshot["suite"].items() if k not in SUITE_MEMBERSHIP}
    run = {k: v for k, v in snapshot["run"].items() if k != "suite"}
    return config_hash({"suite": suite, "run": run})


def _other_snapshot(other: str, scale: str, dir_name: str, data_shape, num_classes: int) -> Optional[dict]:
    """The snapshot of suite ``other``'s run ``dir_name`` at ``scale``, composed as run_suite.py would compose
    ``suite=<other> scale=<scale>`` (no overrides); None when that suite has no such run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"suite={other}", f"scale={scale}"]
    if GlobalHydra.instance().is_initialized():  # inside run_suite.py's @hydra.main
        cfg = compose(config_name="config", overrides=overrides)
    else:  # called outside Hydra (tests, scripts)
        with initialize_config_dir(config_dir=str(SUITES_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    suite = resolve_suite(cfg)
    for run in expand_runs(suite, cfg.scale):
        if run.dir_name == dir_name:
            validate_run(run, data_shape, num_classes)
            return {"suite": OmegaConf.to_container(suite), "run": asdict(run)}
    return None


def reuse_finished_run(snapshot: dict, digest: str, run_dir: Path, runs_dir: Path, sources: List[str], scale: str,
                       data_shape, num_classes: int) -> Optional[list]:
    """This run's rows, copied with its folder from the first suite of ``sources`` holding the same finished run
    (module docstring), or None (train it). ``digest``: this run's config_hash; ``run_dir``: its folder."""
    ours = protocol_hash(snapshot)
    for other in sources:
        source = Path(runs_dir) / other / scale / run_dir.name
        done_file = source / "result.json"
        if not done_file.exists():
            continue
        rows = json.loads(done_file.read_text())
        if not rows or any(row.get("status") != "ok" for row in rows):
            continue
        theirs = _other_snapshot(other, scale, run_dir.name, data_shape, num_classes)
        if theirs is None or rows[0].get("config_hash") != config_hash(theirs) or protocol_hash(theirs) != ours:
            continue
        staging = run_dir.with_name(run_dir.name + ".reuse-tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        reused = [{**row, "suite": snapshot["run"]["suite"], "config_hash": digest,
                   "reused_from": f"{other}/{scale}/{run_dir.name}"} for row in rows]
        atomic_write_text(staging / "result.json", json.dumps(reused, indent=1, default=str))
        atomic_write_text(staging / "config_hash", digest)
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished attempt of this suite: the copy replaces it
        staging.rename(run_dir)
        return reused
    return None
