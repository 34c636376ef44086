"""Interrupted runs, atomic writes, NaN losses, bad input, data parallel: nothing lost, every refusal explained."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write_text
from suite_helpers import alive, descendants, kill_once_logged

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
    assert f"cannot read checkpoint file {broken} (damaged: its SHA-256" in line and "force=true" in line
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
    np.save(folder / "latents_00000.npy", np.zeros((4, 8, 32, 32), np.float16))
    np.save(folder / "labels_00000.npy", np.zeros(4, np.int64))
    meta = {"shape": [8, 32, 32], "scaling_factor": 0.18215, "shards": ["latents_00000.npy"]}
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
    # torchrun: `accelerate launch --cpu --num_processes 2` starts one process (several CPU processes need MPI)
    launch = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", "run_suite.py"]
    res = subprocess.run([*launch, *base, f"results_dir={two}/r", f"runs_dir={two}/runs"], cwd=ROOT, env=ENV,
                         check=True, capture_output=True, text=True)
    assert "data parallel: process 1 of 2" in res.stdout  # two processes really trained
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


def test_keys_are_compared_by_value_so_a_rerun_replaces_its_rows(tmp_path):
    """A seed column pandas wrote as floats (0.0): the rerun's integer seed 0 still replaces its row."""
    from tread_bench.measure.results import upsert_csv

    path = tmp_path / "runs.csv"
    path.write_text("suite,run_id,seed,loss\nsmoke,a,0.0,1.0\nsmoke,a,1.0,2.0\nsmoke,b,0.5,3.0\n")
    table = upsert_csv(path, [{"suite": "smoke", "run_id": "a", "seed": 0, "loss": 9.0}], ["suite", "run_id", "seed"])
    assert sorted(zip(table.run_id, table.seed, table.loss)) == [("a", 0, 9.0), ("a", 1, 2.0), ("b", 0.5, 3.0)]


@pytest.mark.parametrize("damage, why", [
    (lambda text: text[:text.rindex("\n", 0, len(text) - 1)] + "\nsmoke,tiny,dit-tiny-tread",
     "line 3 has no seed: a row cut short"),
    (lambda text: bytes(range(128, 256)).decode("latin-1") * 4, "not UTF-8 text at byte 0"),
    (lambda text: text + 'smoke,tiny,"dit-tiny-tread,0,1.5\n', "Error tokenizing data"),
])
def test_a_damaged_results_table_is_refused_in_one_line_before_training_and_left_as_it_was(tmp_path, damage, why):
    from suite_helpers import run

    base = ["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs",
            "suite.train.steps=2", "suite.data.limit=64"]
    assert run(base) == 0
    table = tmp_path / "results" / "smoke.csv"
    damaged = damage(table.read_text())
    table.write_bytes(damaged.encode("latin-1") if not damaged.isascii() else damaged.encode())
    before = table.read_bytes()
    shutil.rmtree(tmp_path / "runs")
    with pytest.raises(ConfigError) as err:
        run(base)
    message = str(err.value)
    assert message.startswith(f"results table {table} cannot be read (") and why in message and "\n" not in message
    assert message.endswith("move it aside or delete it (a rerun writes it again: finished runs are not trained again)")
    assert table.read_bytes() == before and not (tmp_path / "runs").exists()  # nothing trained, nothing rewritten


HOLD = """
import sys, time
from pathlib import Path
from tread_bench.engine.resume import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_run_folder_held_by_a_process_is_refused_to_others_until_it_dies_even_by_kill_9(tmp_path):
    from tread_bench.engine.resume import RunBusy, run_lock

    holder = subprocess.Popen([PY, "-c", HOLD, str(tmp_path)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy, match=rf"held by another process \(pid {holder.pid}\), which is training it"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    with run_lock(tmp_path):  # the OS dropped the dead process's lock
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_two_invocations_on_one_runs_dir_train_each_run_once(tmp_path):
    """Started together on the same folders: each run is trained by one of them (its stats.jsonl has each step
    once), and the table is the one a single invocation writes."""
    args = ["suite=smoke", "scale=tiny", "suite.train.steps=30", "suite.train.log_every=1", "suite.data.limit=64",
            "tracker=none"]
    single = subprocess.run([PY, "run_suite.py", *args, f"results_dir={tmp_path}/one/results",
                             f"runs_dir={tmp_path}/one/runs"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    both = [subprocess.Popen([PY, "run_suite.py", *args, f"results_dir={tmp_path}/two/results",
                              f"runs_dir={tmp_path}/two/runs"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in both]
    assert all(p.returncode == 0 for p in both), [err[-2000:] for _, err in outputs]
    for run_id in ("dit-tiny-baseline-seed0", "dit-tiny-tread-seed0"):
        stats = [json.loads(line) for line in (tmp_path / "two" / "runs" / "smoke" / "tiny" / run_id / "stats.jsonl")
                 .read_text().splitlines()]
        assert [s["step"] for s in stats] == list(range(1, 31))
        assert losses(tmp_path / "two", run_id) == losses(tmp_path / "one", run_id)
    a = pd.read_csv(tmp_path / "one" / "results" / "smoke.csv").set_index("run_id")
    b = pd.read_csv(tmp_path / "two" / "results" / "smoke.csv").set_index("run_id")
    assert sorted(b.index) == sorted(a.index) and b.status.eq("ok").all()
    assert np.array_equal(a.loc[b.index, "final_loss"].values, b.final_loss.values)


TWO_WORKERS = ["suite=smoke", "scale=tiny", "+suite.jobs=2", "suite.train.steps=60", "suite.train.log_every=1",
               "suite.train.checkpoint_every=5", "suite.data.limit=64", "tracker=none"]


def start_two_workers(tmp_path):
    """The suite with its 2 runs in 2 worker processes, once both runs have logged 8 steps: (process, workers)."""
    cmd = [PY, "run_suite.py", *TWO_WORKERS, f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "runs" / "smoke" / "tiny"
    stats = [runs / r / "stats.jsonl" for r in ("dit-tiny-baseline-seed0", "dit-tiny-tread-seed0")]
    deadline = time.time() + 300
    while time.time() < deadline and not all(s.exists() and len(s.read_text().splitlines()) >= 8 for s in stats):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.1)
    workers = descendants(proc.pid)
    assert len(workers) >= 2
    return proc, workers


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_suite_and_its_workers_and_the_resumed_suite_equals_an_uninterrupted_one(tmp_path, signum):
    proc, workers = start_two_workers(tmp_path / "stopped")
    sent = time.time()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    stopped_after = time.time() - sent
    deadline = time.time() + 5
    while alive(workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(workers), f"workers left: {alive(workers)}"
    assert proc.returncode == 128 + signum and stopped_after < 15, (proc.returncode, stopped_after)
    name = signal.Signals(signum).name
    line = err[err.index("stopped by"):].splitlines()[0]  # after the progress bars' last carriage return
    assert line.startswith(f"stopped by {name}: finished runs and checkpoints are kept; resume with: python "
                           f"run_suite.py suite=smoke")
    assert "Traceback" not in err
    resume = subprocess.run([PY, "run_suite.py", *TWO_WORKERS, f"results_dir={tmp_path}/stopped/results",
                             f"runs_dir={tmp_path}/stopped/runs"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert resume.returncode == 0, resume.stderr[-2000:]
    clean = subprocess.run([PY, "run_suite.py", *TWO_WORKERS, f"results_dir={tmp_path}/clean/results",
                            f"runs_dir={tmp_path}/clean/runs"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    for run_id in ("dit-tiny-baseline-seed0", "dit-tiny-tread-seed0"):
        assert losses(tmp_path / "stopped", run_id) == losses(tmp_path / "clean", run_id)


def test_kill_9_of_the_suite_takes_its_workers_with_it(tmp_path):
    proc, workers = start_two_workers(tmp_path)
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while alive(workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(workers), f"workers left after kill -9 of their parent: {alive(workers)}"
