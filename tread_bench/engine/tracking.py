"""Live tracking of a training run through accelerate's trackers: ``tracker=tensorboard|wandb|none``.

``tensorboard`` (default, offline) writes under ``<run_dir>/tensorboard/``; ``wandb`` makes one W&B run per training
run (project ``tread-bench``) and needs the package, else :func:`check_tracker` stops the suite. The main process
logs ``train/*`` at every log line, ``eval/<column>`` and the image ``eval/samples`` at every evaluation. A resumed
run's events continue its earlier ones (``purge_step``).
Details: docs/internals.md#tread_benchenginetrackingpy
"""
from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path
from typing import Optional

import torch

from tread_bench.core.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "none")
TENSORBOARD_DIR = "tensorboard"  # under the run folder
WANDB_PROJECT = "tread-bench"


def check_tracker(name) -> None:
    """Refuse an unknown tracker, or one whose package is not installed (one line, before any training)."""
    if name not in TRACKERS:
        raise ConfigError(f"tracker = {name}: must be one of {', '.join(TRACKERS)}")
    if name == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("tracker = wandb, but the wandb package is not installed: pip install wandb (then wandb "
                          "login, or WANDB_MODE=offline), or use tracker=tensorboard or tracker=none")
    if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tracker = tensorboard, but the tensorboard package is not installed: pip install "
                          "tensorboard, or use tracker=none")


class RunTracker:
    """One training run's tracker: ``log(values, step)``, ``log_grid(images, columns, step)``, ``finish()``."""

    def __init__(self, name: str, run_dir: Path, run_name: str, group: str, config: Optional[dict] = None,
                 resumed_step: int = 0):
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        check_tracker(name)
        self.name, self.run_dir = name, Path(run_dir)
        if name == "tensorboard":
            from accelerate import PartialState

            if resumed_step == 0 and PartialState().is_main_process:  # a fresh start: events of an earlier attempt would mix with this one's
                shutil.rmtree(self.run_dir / TENSORBOARD_DIR, ignore_errors=True)
            # events the interrupted run wrote after its checkpoint are hidden by TensorBoard
            kwargs = {"purge_step": resumed_step + 1} if resumed_step else {}
            self.tracker = TensorBoardTracker(TENSORBOARD_DIR, self.run_dir, **kwargs)
        else:
            self.tracker = WandBTracker(WANDB_PROJECT, name=run_name, group=group, dir=str(self.run_dir),
                                        config=config or {})
        self.tracker.start()  # on the main process only (accelerate's on_main_process)
        if name == "tensorboard" and config and resumed_step == 0:
            import json

            self.tracker.log({"config": "```\n" + json.dumps(config, indent=1, default=str) + "\n```"}, step=0)

    def log(self, values: dict, step: int) -> None:
        """The numbers of ``values`` (bools, None, NaN and strings left out)."""
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if numbers:
            self.tracker.log(numbers, step=step)

    def log_grid(self, images: torch.Tensor, columns: int, step: int, tag: str = "eval/samples") -> None:
        """A sample grid (images in [-1, 1], laid out as tread_bench.measure.samples.save_grid writes its PNG)."""
        from torchvision.utils import make_grid

        grid = make_grid(((images.detach().float().cpu() + 1) / 2).clamp(0, 1), nrow=columns, padding=1,
                         pad_value=1.0)
        self.tracker.log_images({tag: grid[None]}, step=step)

    def finish(self) -> None:
        self.tracker.finish()


def open_tracker(name: str, run_dir: Path, run_name: str, group: str, config: Optional[dict] = None,
                 resumed_step: int = 0) -> Optional[RunTracker]:
    """A :class:`RunTracker`, or None for ``tracker=none``."""
    if name in (None, "none"):
        check_tracker("none" if name is None else name)
        return None
    return RunTracker(name, run_dir, run_name, group, config, resumed_step)
