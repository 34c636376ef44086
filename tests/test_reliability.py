"""Interrupted runs, atomic writes, NaN losses, bad input, data parallel: nothing lost, every refusal explained."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write_text
from suite_helpers import kill_once_logged

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def suite_cmd(tmp, *extra):
    return [PY, "run_suite.py", "suite=smoke", "scale=tiny", f"results_dir={tmp}/results", f"runs_dir={tmp}/runs",
            "suite.train.steps=30", "suite.train.checkpoint_every=5", "suite.train.log_every=5",
            "suite.data.limit=256", *extra]


def losses(tmp, run_id):
    path = Path(tmp) / "runs" / "smoke" / "tiny" / run_id / "stats.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(suite_cmd(clean), cwd=ROOT, env=ENV, check=True, capture_output=True)
    stats = killed / "runs" / "smoke" / "tiny" / "dit-tiny-tread-seed0" / "stats.jsonl"
    kill_once_logged(suite_cmd(killed), ROOT, ENV, stats)  # mid-way through the SECOND run
    assert not (killed / "results" / "smoke.csv").exists()
    out = subprocess.run(suite_cmd(killed), cwd=ROOT, env=ENV, check=True, capture_output=True, text=True).stdout
    assert "dit-tiny-baseline-seed0] finished earlier, skipped" in out
    for run_id in ("dit-tiny-baseline-seed0", "dit-tiny-tread-seed0"):
        assert losses(killed, run_id) == losses(clean, run_id)  # exact: same draws, same state
    a = pd.read_csv(clean / "results" / "smoke.csv")
    b = pd.read_csv(killed / "results" / "smoke.csv")
    assert len(b) == 2 and b.run_id.is_unique
    assert np.array_equal(a.final_loss.values, b.final_loss.values)


def test_unreadable_checkpoint_fails_its_run_in_one_line_and_the_next_run_trains(tmp_path):
    cmd = [PY, "run_suite.py", "suite=smoke", "scale=tiny", f"results_dir={tmp_path}/results",
           f"runs_dir={tmp_path}/runs", "suite.train.steps=4", "suite.train.checkpoint_every=2",
           "suite.train.log_every=1", "suite.data.limit=64"]
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True)
    runs = tmp_path / "runs" / "smoke" / "tiny"
    broken = runs / "dit-tiny-baseline-seed0" / "checkpoint" / "state.pt"
    broken.write_bytes(b"\x00" * broken.stat().st_size)  # corrupt, same size
    (runs / "dit-tiny-baseline-seed0" / "result.json").unlink()  # so that it resumes
    shutil.rmtree(runs / "dit-tiny-tread-seed0")  # so that it trains again
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 1 and "1 of 2 runs failed: dit-tiny-baseline-seed0" in res.stderr
    (line,) = [x for x in res.stderr.splitlines() if "FAILED" in x]
    assert f"cannot read checkpoint file {broken} (corrupt or truncated" in line and "force=true" in line
    assert "Traceback" not in res.stderr
    table = pd.read_csv(tmp_path / "results" / "smoke.csv").set_index("method")
    assert table.status.to_dict() == {"baseline": "failed", "tread": "ok"}
    assert "cannot read checkpoint file" in table.error["baseline"]
    assert len(losses(tmp_path, "dit-tiny-tread-seed0")) == 4  # trained from scratch after the failure
    # the fix the line names: force=true trains the run again from its start
    subprocess.run(cmd + ["force=true", "only=baseline"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    assert pd.read_csv(tmp_path / "results" / "smoke.csv").status.tolist() == ["ok", "ok"]


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "table.csv"
    atomic_write_text(target, "old,contents\n")

    def killed_before_rename(src, dst):
        raise KeyboardInterrupt("killed between temp file and rename")

    monkeypatch.setattr(os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new,contents\n")
    assert target.read_text() == "old,contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]  # no temp file left behind


def test_nan_loss_fails_the_run_and_the_suite_goes_on(tmp_path):
    res = subprocess.run(suite_cmd(tmp_path, "+suite.train.fault_nan_at_step=3"), cwd=ROOT, env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert "2 of 2 runs failed" in res.stderr
    table = pd.read_csv(tmp_path / "results" / "smoke.csv")
    assert table.method.tolist() == ["baseline", "tread"]  # the second run ran after the first failed
    assert set(table.status) == {"failed"}
    assert table.error.str.contains("loss became nan at step 3").all()


@pytest.mark.parametrize("override, message", [
    ("suite.backbones=[{name:nope,size:tiny}]", "unknown backbone 'nope'"),
    ("suite.methods.tread.routes=[{start:1,end:9,rate:0.5}]", "beyond the last block 5"),
    ("suite.methods.tread.routes=[{start:1,end:3,rate:0.5},{start:2,end:4,rate:0.5}]", "overlap"),
    ("suite.methods.tread.routes=[{start:1,end:3,rate:1.0}]", "must be in [0, 1)"),
    ("suite.data.name=nope", "unknown dataset 'nope'"),
])
def test_bad_input_is_one_clear_error_line(tmp_path, override, message):
    res = subprocess.run(suite_cmd(tmp_path, override), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # refused before any training


def test_unknown_suite_and_config_key_are_refused(tmp_path):
    res = subprocess.run([PY, "run_suite.py", "suite=nope"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 2 and "error: unknown suite 'nope'; choose one of" in res.stderr and "smoke" in res.stderr
    res = subprocess.run(suite_cmd(tmp_path, "suite.trian.steps=3"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 2 and "error: unknown key 'suite.trian'; did you mean 'train'?" in res.stderr


def test_latent_shape_and_scaling_mismatch(tmp_path):
    from tread_bench.data.latents import load_latents

    folder = tmp_path / "lat"
    folder.mkdir()
    np.savez(folder / "shard_00000.npz", latents=np.zeros((4, 8, 32, 32), np.float16), labels=np.zeros(4, np.int64))
    meta = {"shape": [8, 32, 32], "scaling_factor": 0.18215, "shards": ["shard_00000.npz"]}
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="8 channels.*mean\\+logvar"):
        load_latents(str(folder), expected_resolution=32, expected_channels=4)
    (folder / "meta.json").write_text(json.dumps({**meta, "shape": [4, 32, 32], "scaling_factor": 1.0}))
    with pytest.raises(ConfigError, match="scaling_factor 1.0, expected 0.18215"):
        load_latents(str(folder), expected_resolution=32)
    with pytest.raises(ConfigError, match="missing .*meta.json"):
        load_latents(str(tmp_path / "nowhere"))


def test_row_selection_on_tokens_that_are_not_a_grid():
    import torch

    from routing import select

    with pytest.raises(ConfigError, match="row-wise selection needs tokens that form a grid"):
        select("rows", 2, None, 10, 0.5, torch.Generator(), torch.device("cpu"))


def test_global_batch_must_divide_by_processes():
    from types import SimpleNamespace

    from tread_bench.data import load_dataset
    from tread_bench.training.trainer import Trainer, TrainConfig
    from suite_helpers import build_denoiser

    data = load_dataset("synthetic", 32, limit=8)
    den = build_denoiser("dit", "tiny", data.shape, data.num_classes)
    fake = SimpleNamespace(num_processes=2, process_index=0)
    with pytest.raises(ConfigError, match="global batch 15 is not divisible by 2 processes"):
        Trainer(den, data, TrainConfig(global_batch=15), "/tmp/unused", accelerator=fake)


@pytest.mark.slow
def test_two_processes_give_the_one_process_loss_curve(tmp_path):
    base = ["suite=smoke", "scale=tiny", "suite.train.steps=20", "only=tread"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([PY, "run_suite.py", *base, f"results_dir={one}/r", f"runs_dir={one}/runs"], cwd=ROOT, env=ENV,
                   check=True, capture_output=True)
    launch = [PY, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "run_suite.py"]
    subprocess.run([*launch, *base, f"results_dir={two}/r", f"runs_dir={two}/runs"], cwd=ROOT, env=ENV, check=True,
                   capture_output=True)
    a = [json.loads(x)["loss"] for x in (one / "runs/smoke/tiny/dit-tiny-tread-seed0/stats.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (two / "runs/smoke/tiny/dit-tiny-tread-seed0/stats.jsonl").read_text().splitlines()]
    # Same global batch and draws; only the gradient all-reduce order differs. Tolerance: 1e-5 relative.
    assert len(a) == len(b) == 2
    assert np.allclose(a, b, rtol=1e-5, atol=0)
    assert len(pd.read_csv(two / "r" / "smoke.csv")) == 1  # written once, by rank 0


def test_a_table_written_with_no_rows_takes_rows_later(tmp_path):
    """An `only=` sitting without a baseline writes its speedup table with no rows (one empty line); the next
    sitting upserts into it instead of failing on a file with no columns."""
    from tread_bench.measure.results import upsert_csv

    path = tmp_path / "speedup.csv"
    assert len(upsert_csv(path, [], ["run_id"])) == 0
    assert path.read_text().strip() == ""
    table = upsert_csv(path, [{"run_id": "a", "x": 1}], ["run_id"])
    assert table.to_dict("records") == [{"run_id": "a", "x": 1}]
    assert pd.read_csv(path).to_dict("records") == [{"run_id": "a", "x": 1}]
