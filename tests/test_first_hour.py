"""What a newcomer sees before and while a suite trains: the runs, a measured time estimate and the files before
training, "k of N" with the time left while it trains, how far unfinished runs got, and the plan at CPU scale."""
import json
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from tread_bench.engine.spec import RunSpec
from tread_bench.engine.tables import COMMITTED_RESULTS, committed_training_time
from tread_bench.engine.lifecycle import Progress
from tread_bench.engine.lifecycle import progress_of
from tread_bench.engine.spec import resolve_suite
from suite_helpers import compose_suite, run


def test_a_sitting_announces_its_runs_and_files_and_counts_them_as_they_finish(tmp_path, capsys):
    run(["suite=smoke", "scale=tiny", "suite.train.steps=2", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs"])
    out = capsys.readouterr().out
    assert "smoke (tiny): 2 runs to train, 1 at a time" in out
    assert f"writes: {tmp_path}/r/smoke.csv, {tmp_path}/r/smoke_speedup.csv and .md" in out
    assert "run 1 of 2" in out and "run 2 of 2" in out
    assert "1 of 2 runs finished" in out and "about" in out and "2 of 2 runs finished" in out


def test_the_estimate_is_the_committed_tables_measured_training_time():
    """Against the committed CPU study's table read by hand: the final wall_time_s of the two runs, summed."""
    table = pd.read_csv(COMMITTED_RESULTS / "arch_agnostic_runs.csv")
    suite = resolve_suite(compose_suite(["suite=arch_agnostic", "scale=cpu"]))
    runs = [RunSpec("arch_agnostic", "cpu", "dit", "XS/4", m, "tread", seed=1) for m in ("baseline", "tread")]
    mine = table[(table.scale == "cpu") & (table.seed == 1) & table.run_id.isin(["dit-XS4-baseline", "dit-XS4-tread"])]
    by_hand = mine.groupby("run_id").wall_time_s.max().sum()
    seconds, device, found = committed_training_time(suite, "cpu", runs)
    assert found == 2 and abs(seconds - by_hand) < 1e-9 and device == mine.device.iloc[0]
    assert committed_training_time(suite, "tiny", runs) is None  # no committed tiny runs: no estimate


def test_a_run_configured_otherwise_than_the_committed_one_gets_no_estimate(capsys):
    runs = [RunSpec("crossover", "full", "dit", "XS/4", m, "tread", seed=0) for m in ("baseline", "tread")]
    suite = resolve_suite(compose_suite(["suite=crossover"]))
    assert committed_training_time(suite, "full", runs)[2] == 2  # batch 32, 1,800 steps: the committed runs
    for change in ("suite.train.global_batch=128", "suite.train.steps=3600", "suite.data.resolution=28"):
        assert committed_training_time(resolve_suite(compose_suite(["suite=crossover", change])), "full", runs) is None
    other_route = RunSpec("crossover", "full", "dit", "XS/4", "tread", "tread", seed=0)
    other_route.setting = "r(1->3)@0.5"
    assert committed_training_time(suite, "full", [other_route]) is None


def test_progress_counts_runs_and_estimates_the_rest_at_the_pace_so_far(capsys, monkeypatch):
    clock = iter([0.0, 60.0, 150.0])
    monkeypatch.setattr("tread_bench.engine.lifecycle.time.perf_counter", lambda: next(clock))
    progress = Progress(3)
    progress.done("a", True)   # 60 s for 1 run: 2 left at that pace = 120 s, shown in minutes from 90 s
    progress.done("b", False)  # 150 s for 2: 1 left = 75 s
    out = capsys.readouterr().out.splitlines()
    assert out == ["[a] done: 1 of 3 runs finished, 60 s so far, about 2 min left",
                   "[b] FAILED: 2 of 3 runs finished, 2 min so far, about 75 s left"]  # 150 s: 2.5 min, rounded


def test_report_says_how_far_an_unfinished_run_got(tmp_path):
    suite = OmegaConf.create({"train": {"steps": 1800}})
    assert progress_of(tmp_path / "never", suite) == "not started"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stats.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n"
                                                          for s in (10, 20, 600)))
    assert progress_of(tmp_path / "run", suite) == "step 600 of 1800 logged"
