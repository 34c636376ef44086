"""Every suite's scale=tiny version composes and runs to its CSV; multirun with the local launcher."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from suite_helpers import run

ROOT = Path(__file__).resolve().parents[1]

TRAIN_SUITES = {"smoke": "smoke.csv", "dit_scaling": "dit_scaling_runs.csv",
                "selection_rate": "selection_rate_runs.csv", "route_ablation": "route_ablation_runs.csv",
                "arch_agnostic": "arch_agnostic_runs.csv"}


@pytest.mark.parametrize("suite", sorted(TRAIN_SUITES))
def test_tiny_train_suite_runs_to_csv(tmp_path, suite):
    overrides = [f"suite={suite}", "scale=tiny", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs",
                 "suite.train.steps=4", "suite.data.limit=64", "suite.eval.samples=0"]
    assert run(overrides) == 0
    table = pd.read_csv(tmp_path / "r" / TRAIN_SUITES[suite])
    assert set(table.status) == {"ok"} and (table.steps == 4).all()
    assert table.method.iloc[0] == "baseline" and table.method.nunique() >= 2
    speed = pd.read_csv(tmp_path / "r" / f"{suite}_speedup.csv")
    assert len(speed) == table.method.nunique() * table.backbone.nunique() - table.backbone.nunique()
    assert (speed.flop_ratio > 1).all()


def test_arch_agnostic_tiny_has_every_backbone_with_rows_for_scans(tmp_path):
    assert run(["suite=arch_agnostic", "scale=tiny", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs",
                "suite.train.steps=4", "suite.data.limit=64", "suite.eval.samples=0", "suite.eval.grid_per_class=0",
                "suite.seeds=[0]", "suite.jobs=1"]) == 0
    table = pd.read_csv(tmp_path / "r" / "arch_agnostic_runs.csv")
    selection = dict(zip(table[table.method == "tread"].backbone, table[table.method == "tread"].selection))
    assert selection == {"dit": "random", "rwkv": "rows", "mamba": "rows", "lightningdit": "random"}


def test_tiny_study_produces_every_file_kind(tmp_path):
    """The CI-sized study: 2 seeds in 2 worker processes, held-out loss at every evaluation, grids, FID at
    the final step, interval columns, curves with bands, side-by-side sample figures."""
    r = tmp_path / "r"
    assert run(["suite=arch_agnostic", "scale=tiny", f"results_dir={r}", f"runs_dir={tmp_path}/runs",
                "suite.train.steps=8", "suite.eval.every=4", "suite.data.limit=64",
                "suite.backbones=[{name:dit,size:tiny}]"]) == 0
    table = pd.read_csv(r / "arch_agnostic_runs.csv")
    assert sorted(set(zip(table.method, table.seed))) == [("baseline", 0), ("baseline", 1), ("tread", 0), ("tread", 1)]
    assert (table.scale == "tiny").all() and table.eval_loss.notna().all()
    assert sorted(table.step.unique()) == [4, 8]
    assert table[table.step == 8].fid.notna().all() and table[table.step == 4].fid.isna().all()  # FID at the end
    assert all(Path(p).exists() for p in table.grid)
    level_columns = [c for c in table.columns if c.startswith("eval_loss_sigma")]
    assert len(level_columns) == 4
    speed = pd.read_csv(r / "arch_agnostic_speedup.csv")
    for col in ("eval_loss_diff", "eval_loss_diff_ci95", "iteration_speedup_ci95", "fid_diff_ci95", "loss_reached"):
        assert col in speed.columns
    assert speed.seeds.iloc[0] == 2
    for name in ("arch_agnostic_tiny_dit-tiny.png", "arch_agnostic_tiny_samples_dit-tiny.png",
                 "arch_agnostic_speedup.md", "arch_agnostic_tiny_config.yaml"):
        assert (r / name).exists(), name


def test_throughput_protocol_tiny_produces_every_column(tmp_path):
    assert run(["suite=throughput", "scale=tiny", f"results_dir={tmp_path}/r", "suite.rounds=2",
                "suite.backbones=[{name:dit,size:tiny}]"]) == 0
    table = pd.read_csv(tmp_path / "r" / "throughput.csv")
    for col in ("mean_ms", "p50_ms", "p90_ms", "samples_per_s", "peak_mem_mb", "batch", "precision", "device",
                "torch", "measured_speedup", "predicted_speedup", "measured_over_predicted"):
        assert col in table.columns
    tread = table[table.method == "tread"].iloc[0]
    assert np.isfinite(tread.measured_speedup) and tread.predicted_speedup > 1
    assert (tmp_path / "r" / "throughput.md").exists()


def test_flops_tiny_table(tmp_path):
    assert run(["suite=flops", "scale=tiny", f"results_dir={tmp_path}/r",
                "suite.backbones=[{name:dit,size:tiny},{name:rwkv,size:tiny},{name:mamba,size:tiny}]"]) == 0
    table = pd.read_csv(tmp_path / "r" / "flops.csv")
    assert len(table) == 3 and (table.ratio > 1).all() and (table.counter_rel_diff < 0.02).all()


def test_guidance_tiny(tmp_path):
    """Every file kind; each mode's sampling cost from the passes it runs; a rerun samples nothing again and a new
    mode samples the trained models without retraining them."""
    out = tmp_path / "r"
    base = ["suite=guidance", "scale=tiny", f"results_dir={out}", f"runs_dir={tmp_path}/runs"]
    assert run(base) == 0
    for name in ("guidance.csv", "guidance_summary.csv", "guidance_summary.md", "guidance_tiny.png",
                 "guidance_tiny_samples.png", "guidance_tiny_config.yaml"):
        assert (out / name).stat().st_size > 0, name
    table = pd.read_csv(out / "guidance.csv")
    modes = {m: table[table.method == m]["mode"].tolist() for m in ("baseline", "tread", "sprint")}
    assert modes == {"baseline": ["unguided", "cfg_low", "cfg_high"],
                     "tread": ["unguided", "cfg_low", "cfg_high", "sg_a", "sg_b", "sg_c"],
                     "sprint": ["unguided", "cfg_low", "cfg_high", "sg_a", "sg_b", "sg_c", "pdg_low", "pdg_high"]}
    assert table.fid.notna().all() and table.kid.notna().all() and (table.nfe == 3).all()  # Heun: 2 * 2 - 1
    cost = table.set_index(["method", "mode"]).cost_vs_unguided
    assert (cost[:, "unguided"] == 1).all() and (cost[:, "cfg_high"] == 2).all()
    # TREAD r(2->2) on the tiny DiT (6 blocks, 64 tokens): a pass at rate r runs block 2 on 64 - floor(64 r)
    # tokens; Sparse Guidance runs one pass at each rate, so its cost lies between one and two full passes
    assert 1 < cost["tread", "sg_a"] < cost["tread", "sg_b"] < 2 and cost["tread", "sg_b"] == cost["tread", "sg_c"]
    # hand count of tests/test_sprint.py (test_flops_match_a_hand_count_with_the_fusion_layer): dense pass vs
    # path-dropped pass; path-drop guidance is one of each
    dense, dropped = 22_851_584, 15_462_400
    assert cost["sprint", "pdg_low"] == pytest.approx(1 + dropped / dense)
    assert table.set_index(["method", "mode"]).guidance["sprint", "pdg_low"] == "cfg 1.5, uncond rate 1"
    summary = pd.read_csv(out / "guidance_summary.csv")
    assert len(summary) == len(table) and set(summary.label) >= {"unguided", "CFG 1.5", "PDG 3", "SG 0/0.5 x3"}

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("checkpoint/ema.safetensors")}
    assert run(base + ["+suite.sampling.cfg_mid={cfg_scale:2.0}", "suite.jobs=2"]) == 0  # sampled in 2 workers
    again = pd.read_csv(out / "guidance.csv")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # not retrained
    old = again.merge(table, on=["method", "seed", "mode"], suffixes=("", "_before"))
    assert len(old) == len(table) and (old.fid == old.fid_before).all()  # read back, not sampled again
    assert len(again) == len(table) + 3 and again[again["mode"] == "cfg_mid"].fid.notna().all()


def test_multirun_with_the_local_launcher(tmp_path):
    """hydra-submitit-launcher for real: submitit's local executor runs each multirun entry as a job in its own
    process, with the job shape the SLURM launcher shares (suites/hydra/launcher/shape/job.yaml); the two jobs
    run at the same time and both land their rows in the same table."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "run_suite.py", "-m", "hydra/launcher=local", "suite=smoke", "scale=tiny",
                          "suite.seed=0,1", "suite.train.steps=3", "suite.data.limit=64", "tracker=none",
                          f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs", f"hydra.sweep.dir={tmp_path}/sweep"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    table = pd.read_csv(tmp_path / "r" / "smoke.csv")
    # one row per run and seed: the second job neither replaced nor resumed the first one's runs
    assert sorted(table.seed.tolist()) == [0, 0, 1, 1]
    assert table.groupby("seed").final_loss.apply(tuple).nunique() == 2
    jobs = list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))  # submitit's own record of each job
    assert len(jobs) == 2, list((tmp_path / "sweep").rglob("*"))


def test_slurm_launcher_differs_from_the_local_one_only_in_cluster_fields():
    from hydra import compose, initialize_config_dir

    from suite_helpers import SUITES

    with initialize_config_dir(config_dir=SUITES, version_base="1.3"):
        local = compose("config", ["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
        slurm = compose("config", ["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
    shape = ("submitit_folder", "name", "nodes", "tasks_per_node", "stderr_to_stdout")
    assert all(local[k] == slurm[k] for k in shape)
    assert local._target_.endswith("LocalLauncher") and slurm._target_.endswith("SlurmLauncher")
    differ = {k for k in slurm if k not in local or slurm[k] != local[k]} - {"_target_"}
    cluster = {"partition", "account", "qos", "constraint", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min",
               "setup", "comment", "exclude", "gres", "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu",
               "signal_delay_s", "max_num_timeout", "additional_parameters", "array_parallelism"}
    assert differ <= cluster, differ - cluster
