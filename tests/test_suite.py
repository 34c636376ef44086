"""The smoke suite end to end: one row per run, reruns replace rows, finished runs are skipped."""
import pandas as pd
import pytest

from core.errors import ConfigError
from suite_helpers import run

COLUMNS = ["suite", "backbone", "size", "method", "routes", "selection", "params", "steps", "images_seen",
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
