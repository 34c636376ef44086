"""Live tracking (tread_bench/engine/tracking.py): tensorboard events under the run folder, none with tracker=none."""
import sys
import types

import pytest

from tread_bench.core.errors import ConfigError
from suite_helpers import run

ARGS = ["suite=smoke", "scale=tiny", "suite.train.steps=4", "suite.train.log_every=2", "suite.data.limit=64",
        "suite.eval.every=2", "++suite.eval.grid_per_class=1", "++suite.eval.sampler_steps=2", "++suite.eval.loss_images=16",
        "++suite.eval.loss_levels=2", "only=baseline"]


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_logs_loss_speed_lr_eval_and_the_sample_grid(tmp_path):
    assert run(ARGS + [f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs", "tracker=tensorboard"]) == 0
    folder = tmp_path / "runs" / "smoke" / "tiny" / "dit-tiny-baseline-seed0" / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*"))
    acc = events(folder)
    scalars = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/samples_per_s", "train/lr", "eval/eval_loss"):
        assert tag in scalars, (tag, scalars)
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    assert all(e.value > 0 for e in acc.Scalars("train/samples_per_s"))
    assert [e.step for e in acc.Scalars("eval/eval_loss")] == [2, 4]
    assert any(t.startswith("eval/eval_loss_sigma") for t in scalars)
    images = acc.Images("eval/samples")  # the grid at each evaluation: 10 classes x 1 row of 32x32 images
    assert [e.step for e in images] == [2, 4] and images[0].width > images[0].height > 32


def test_tracker_none_writes_no_events(tmp_path):
    assert run(ARGS + [f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs", "tracker=none"]) == 0
    assert (tmp_path / "runs" / "smoke" / "tiny" / "dit-tiny-baseline-seed0" / "result.json").exists()
    assert not list((tmp_path / "runs").rglob("events.out.tfevents.*"))


def test_wandb_without_the_package_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, installed or not
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    with pytest.raises(ConfigError, match="wandb package is not installed: pip install wandb"):
        run(ARGS + [f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs", "tracker=wandb"])
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="tracker = mlflow: must be tensorboard, wandb or none"):
        run(ARGS + [f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs", "tracker=mlflow"])


def test_wandb_tracker_goes_through_accelerates_wandb_tracker(tmp_path, monkeypatch):
    """With a stand-in wandb module: the run is initialised with its name and folder, numbers and images logged."""
    import torch

    from tread_bench.engine.tracking import RunTracker

    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(
        log=lambda values, step=None, **k: calls.append(("log", values, step)), finish=lambda: calls.append(("finish",)))
    fake.Image = lambda image: ("image", tuple(image.shape))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("tread_bench.engine.tracking.check_tracker", lambda name: None)
    tracker = RunTracker("wandb", tmp_path, "dit-tiny-baseline-seed0", "smoke_tiny", {"lr": 1e-3})
    tracker.log({"train/loss": 0.5, "note": "text", "nan": float("nan")}, step=3)
    tracker.log_grid(torch.zeros(10, 1, 8, 8), 10, step=3)
    tracker.finish()
    init = calls[0][1]
    assert init["project"] == "tread-bench" and init["name"] == "dit-tiny-baseline-seed0"
    assert init["group"] == "smoke_tiny" and init["dir"] == str(tmp_path) and init["config"] == {"lr": 1e-3}
    assert ("log", {"train/loss": 0.5}, 3) in calls
    assert any(c[0] == "log" and "eval/samples" in c[1] for c in calls) and calls[-1] == ("finish",)
