"""The smoke suite end to end: one row per run, reruns replace rows, finished runs are skipped."""
import shutil

import pandas as pd
import pytest

from tread_bench.core.errors import ConfigError
from suite_helpers import run

COLUMNS = ["suite", "backbone", "size", "method", "setting", "selection", "params", "steps", "images_seen",
           "final_loss", "samples_per_s", "wall_time_s", "device", "torch", "seed", "status"]


def test_smoke_suite_writes_rows_and_rerun_replaces_them(tmp_path, capsys):
    args = ["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs",
            "suite.train.steps=10", "suite.data.limit=256"]
    assert run(args) == 0
    csv = tmp_path / "results" / "smoke.csv"
    first = pd.read_csv(csv)
    assert all(c in first.columns for c in COLUMNS)
    assert first.method.tolist() == ["baseline", "tread"] and set(first.status) == {"ok"}
    assert (tmp_path / "results" / "smoke_tiny_config.yaml").exists()
    assert run(args) == 0  # finished runs are skipped, rows replaced not appended
    assert "skipped" in capsys.readouterr().out
    again = pd.read_csv(csv)
    assert len(again) == 2
    pd.testing.assert_frame_equal(first, again)
    assert run(args + ["force=true"]) == 0
    assert len(pd.read_csv(csv)) == 2


def test_bad_route_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="beyond the last block"):
        run(["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs",
             "suite.methods.tread.routes=[{start:1,end:9,rate:0.5}]"])
    assert not (tmp_path / "runs").exists()


def test_report_writes_tables_from_finished_runs_and_trains_nothing(tmp_path, capsys):
    args = ["suite=smoke", "scale=tiny", f"runs_dir={tmp_path}/runs", "suite.train.steps=4", "suite.data.limit=64"]
    assert run(args + [f"results_dir={tmp_path}/empty", "report=true"]) == 0  # nothing finished yet
    assert not (tmp_path / "runs").exists() and not (tmp_path / "empty" / "smoke.csv").exists()
    assert run(args + [f"results_dir={tmp_path}/trained", "only=baseline"]) == 0
    assert run(args + [f"results_dir={tmp_path}/report", "report=true"]) == 0
    out = capsys.readouterr().out
    assert "dit-tiny-tread-seed0] not finished (not started), left out of the report" in out
    assert not (tmp_path / "runs" / "smoke" / "tiny" / "dit-tiny-tread-seed0").exists()  # nothing of it touched
    trained = pd.read_csv(tmp_path / "trained" / "smoke.csv")
    reported = pd.read_csv(tmp_path / "report" / "smoke.csv")
    pd.testing.assert_frame_equal(trained, reported)


def test_report_without_run_folders_writes_the_tables_from_the_runs_table(tmp_path, capsys):
    """Units run on other machines, their rows merged into one runs table: report=true writes the tables from it."""
    args = ["suite=smoke", "scale=tiny", "suite.train.steps=4", "suite.data.limit=64"]
    assert run(args + [f"results_dir={tmp_path}/trained", f"runs_dir={tmp_path}/runs"]) == 0
    trained = pd.read_csv(tmp_path / "trained" / "smoke_speedup.csv")
    merged = tmp_path / "merged"
    merged.mkdir()
    shutil.copy(tmp_path / "trained" / "smoke.csv", merged / "smoke.csv")
    # a row of a method the suite no longer has: the scale's rows are recomputed whole, so it goes
    pd.concat([trained, trained.assign(method="gone")]).to_csv(merged / "smoke_speedup.csv", index=False)
    capsys.readouterr()
    assert run(args + [f"results_dir={merged}", f"runs_dir={tmp_path}/no_runs", "report=true"]) == 0
    assert f"tables from the rows of {merged / 'smoke.csv'}" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(merged / "smoke_speedup.csv"), trained)
    assert not (tmp_path / "no_runs").exists()
