"""Data parallel through the launchers: each task of a submitit job (SLURM's, or the local executor's) becomes one
process of one training run, with its rank, world size and master address; two such processes on CPU (gloo)
train as one process does."""
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from tread_bench.kinds.train import join_submitit_tasks

ROOT = Path(__file__).resolve().parents[1]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLURM_TASK = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
              "SLURM_NODEID": "1", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}


@pytest.fixture
def slurm_task(monkeypatch):
    """Task 5 of a job of 2 nodes x 4 tasks as SLURM describes it (srun's variables), no torch.distributed set;
    the whole environment comes back afterwards (the export writes keys monkeypatch never saw)."""
    with mock.patch.dict(os.environ):
        for key in (*DIST_VARS, "CUDA_VISIBLE_DEVICES"):
            monkeypatch.delenv(key, raising=False)
        for key, value in SLURM_TASK.items():
            monkeypatch.setenv(key, value)
        yield monkeypatch


def test_a_slurm_task_exports_its_rank_world_size_and_the_first_node_as_master(slurm_task):
    join_submitit_tasks()
    assert {k: os.environ[k] for k in DIST_VARS[:5]} == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                                        "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07"}
    assert 20000 <= int(os.environ["MASTER_PORT"]) <= 60000  # one port for the job: seeded by its id
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # accelerate picks GPU LOCAL_RANK of those SLURM shows


def test_a_master_port_set_for_the_job_is_kept(slurm_task):
    slurm_task.setenv("MASTER_PORT", "29555")
    join_submitit_tasks()
    assert os.environ["MASTER_PORT"] == "29555" and os.environ["RANK"] == "5"


@pytest.mark.parametrize("change", [{"SUBMITIT_EXECUTOR": None}, {"SLURM_NTASKS": "1"}, {"RANK": "3"}],
                         ids=["not-a-submitit-job", "one-task", "launched-by-torchrun"])
def test_nothing_is_exported_outside_a_job_of_several_tasks(slurm_task, change):
    for key, value in change.items():
        if value is None:
            slurm_task.delenv(key)
        else:
            slurm_task.setenv(key, value)
    join_submitit_tasks()
    assert os.environ.get("RANK") == change.get("RANK") and "MASTER_ADDR" not in os.environ


def test_the_slurm_launcher_starts_one_task_per_gpu_on_every_node():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from suite_helpers import SUITES

    with initialize_config_dir(config_dir=SUITES, version_base="1.3"):
        one = compose("config", ["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
        many = compose("config", ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8", "hydra.launcher.nodes=2"],
                       return_hydra_config=True).hydra.launcher
    assert (one.gpus_per_node, one.tasks_per_node, one.nodes) == (1, 1, 1)
    params = instantiate(many).params  # what the launcher hands submitit (sbatch --ntasks-per-node, --nodes)
    assert (params["gpus_per_node"], params["tasks_per_node"], params["nodes"]) == (8, 8, 2)


def losses(runs: Path) -> list[float]:
    (stats,) = runs.glob("smoke/tiny/*/stats.jsonl")
    return [json.loads(line)["loss"] for line in stats.read_text().splitlines()]


def weights(runs: Path, name: str) -> dict:
    from safetensors.torch import load_file

    (path,) = runs.glob(f"smoke/tiny/*/checkpoint/{name}.safetensors")
    return load_file(path)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["edm", "flow"])
def test_two_tasks_of_a_local_launcher_job_train_as_one_process(tmp_path, objective):
    """The job starts as a SLURM one does (submitit runs the pickled Hydra job in each task's process); its two
    processes join by gloo and give one process's loss curve and final weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = ["suite=smoke", "scale=tiny", f"objective={objective}", "only=tread", "suite.train.steps=20", "tracker=none"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "run_suite.py", *run, f"results_dir={one}/r", f"runs_dir={one}/runs"], cwd=ROOT,
                   env=env, check=True, capture_output=True, timeout=600)
    res = subprocess.run([sys.executable, "run_suite.py", "-m", "hydra/launcher=local",
                          "hydra.launcher.tasks_per_node=2", *run, f"results_dir={two}/r", f"runs_dir={two}/runs",
                          f"hydra.sweep.dir={two}/sweep"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = sorted((two / "sweep" / ".submitit").glob("*/*_log.*"))
    assert res.returncode == 0, res.stderr[-2000:] + "".join(log.read_text()[-2000:] for log in logs)
    said = [line for log in logs for line in log.read_text().splitlines() if line.startswith("data parallel:")]
    assert sorted(said) == [f"data parallel: process {i} of 2 (gloo, cpu:0), 8 images of each global batch"
                            for i in (0, 1)], said
    a, b = losses(one / "runs"), losses(two / "runs")
    # same global batch and draws; only the order of the gradient all-reduce's sums differs
    assert len(a) == len(b) == 2 and np.allclose(a, b, rtol=1e-5, atol=0)
    for name in ("model", "ema"):
        wa, wb = weights(one / "runs", name), weights(two / "runs", name)
        assert wa.keys() == wb.keys()
        assert all(np.allclose(wa[k].numpy(), wb[k].numpy(), rtol=0, atol=1e-5) for k in wa), name
    assert len(pd.read_csv(two / "r" / "smoke.csv")) == 1  # written once, by rank 0
