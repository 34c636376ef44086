"""Compose run_suite's Hydra config in-process, as `python run_suite.py ...` would."""
from pathlib import Path

from hydra import compose, initialize_config_dir

import run_suite
import runner

SUITES = str(Path(run_suite.__file__).resolve().parent / "suites")


def compose_suite(overrides):
    """The composed config, with scale=auto resolved as run_suite.py resolves it."""
    with initialize_config_dir(config_dir=SUITES, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
        return runner.apply_auto_scale(cfg, list(overrides), compose)


def run(overrides):
    """What run_suite.py does, in-process: ConfigErrors are raised (run_suite prints them and exits 2)."""
    cfg = compose_suite(overrides)
    runner.validate_suite(cfg)
    suite = runner.resolve_suite(cfg)
    return runner.SUITE_KINDS[suite.get("kind", "train")](cfg, suite)
