"""suite.reuse_from: a run another suite finished under the same protocol is copied, not trained; any change of
protocol trains it; the source is never touched (tread_bench/engine/reuse.py)."""
import json

import pandas as pd
import pytest

from tread_bench.core.errors import ConfigError
from tread_bench.engine.reuse import protocol_hash
from tread_bench.engine.spec import config_hash
from suite_helpers import run


def test_a_finished_run_of_the_same_protocol_is_copied_and_a_changed_protocol_trains(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert run(["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/a", f"runs_dir={runs}"]) == 0
    source = runs / "smoke" / "tiny" / "dit-tiny-tread-seed0" / "result.json"
    before = source.read_text()
    capsys.readouterr()

    assert run(["suite=smoke", "scale=tiny", "suite.name=smoke_copy", "+suite.reuse_from=[smoke]",
                f"results_dir={tmp_path}/b", f"runs_dir={runs}"]) == 0
    out = capsys.readouterr().out
    assert "[dit-tiny-baseline-seed0] the same run finished in smoke/tiny/dit-tiny-baseline-seed0: copied" in out
    assert "[dit-tiny-tread-seed0] the same run finished in smoke/tiny/dit-tiny-tread-seed0: copied" in out
    assert source.read_text() == before  # the source is read, never written
    a = pd.read_csv(tmp_path / "a" / "smoke.csv").set_index("run_id")
    b = pd.read_csv(tmp_path / "b" / "smoke.csv").set_index("run_id")
    assert set(b.suite) == {"smoke_copy"} and set(b.reused_from) == {"smoke/tiny/dit-tiny-baseline-seed0",
                                                                     "smoke/tiny/dit-tiny-tread-seed0"}
    assert b.loc[a.index, "final_loss"].tolist() == a.final_loss.tolist()
    copied = runs / "smoke_copy" / "tiny" / "dit-tiny-tread-seed0"
    rows = json.loads((copied / "result.json").read_text())
    assert (copied / "config_hash").read_text() == rows[0]["config_hash"] != json.loads(before)[0]["config_hash"]
    assert (copied / "stats.jsonl").read_text() == (source.parent / "stats.jsonl").read_text()

    # a second call finds the copies finished in its own folder
    assert run(["suite=smoke", "scale=tiny", "suite.name=smoke_copy", "+suite.reuse_from=[smoke]",
                f"results_dir={tmp_path}/b", f"runs_dir={runs}"]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2

    # the same run under another method name is the same run: copied, with this suite's name for it
    assert run(["suite=smoke", "scale=tiny", "suite.name=smoke_renamed", "+suite.reuse_from=[smoke]", "only=half",
                "~suite.methods.tread", "+suite.methods.half={routes: [{start: 1, end: 3, rate: 0.5}]}",
                f"results_dir={tmp_path}/d", f"runs_dir={runs}"]) == 0
    assert ("[dit-tiny-half-seed0] the same run finished in smoke/tiny/dit-tiny-tread-seed0: copied"
            in capsys.readouterr().out)
    d = pd.read_csv(tmp_path / "d" / "smoke.csv")
    assert (d.run_id.tolist(), d.method.tolist()) == (["dit-tiny-half"], ["half"])
    assert d.final_loss.tolist() == [a.loc["dit-tiny-tread", "final_loss"]]
    # the same name with another rate is another run: trained
    assert run(["suite=smoke", "scale=tiny", "suite.name=smoke_rate", "+suite.reuse_from=[smoke]", "only=tread",
                "suite.methods.tread.routes=[{start: 1, end: 3, rate: 0.25}]", "suite.train.steps=4",
                f"results_dir={tmp_path}/e", f"runs_dir={runs}"]) == 0
    assert "copied" not in capsys.readouterr().out

    # another learning rate is another protocol: trained, not copied
    assert run(["suite=smoke", "scale=tiny", "suite.name=smoke_lr", "+suite.reuse_from=[smoke]", "suite.train.lr=2e-3",
                "only=baseline", f"results_dir={tmp_path}/c", f"runs_dir={runs}"]) == 0
    assert "copied" not in capsys.readouterr().out
    c = pd.read_csv(tmp_path / "c" / "smoke.csv")
    assert "reused_from" not in c or c.reused_from.isna().all()
    assert c.final_loss.iloc[0] != a.loc["dit-tiny-baseline", "final_loss"]


def test_the_protocol_leaves_out_what_only_names_or_lists_runs():
    snapshot = {"suite": {"name": "a", "seeds": [0, 1], "methods": {"x": {}}, "jobs": 2, "train": {"lr": 1e-3}},
                "run": {"suite": "a", "backbone": "dit", "seed": 0}}
    renamed = {"suite": {"name": "b", "seeds": [0], "methods": {}, "jobs": 1, "train": {"lr": 1e-3}},
               "run": {"suite": "b", "backbone": "dit", "seed": 0}}
    other_lr = {"suite": {**snapshot["suite"], "train": {"lr": 2e-3}}, "run": snapshot["run"]}
    other_seed = {"suite": snapshot["suite"], "run": {**snapshot["run"], "seed": 1}}
    assert protocol_hash(snapshot) == protocol_hash(renamed)
    # a method entry's name is a label: "tread" in one suite may be "rate0.5" in another
    relabelled = {**snapshot, "run": {**snapshot["run"], "method": "rate0.5"}}
    assert protocol_hash(relabelled) == protocol_hash(snapshot) and config_hash(relabelled) != config_hash(snapshot)
    assert config_hash(snapshot) != config_hash(renamed)
    assert protocol_hash(other_lr) != protocol_hash(snapshot) != protocol_hash(other_seed)
    # where runs are copied from does not change a run: its configuration hash ignores reuse_from
    assert config_hash({**snapshot, "suite": {**snapshot["suite"], "reuse_from": ["b"]}}) == config_hash(snapshot)
    # nor which seeds a sitting trains or how many at a time (a unit of work: only=... 'suite.seeds=[1]')
    one_unit = {**snapshot, "suite": {**snapshot["suite"], "seeds": [0], "jobs": 1}}
    assert config_hash(one_unit) == config_hash(snapshot)


def test_an_unknown_source_suite_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="suite.reuse_from: unknown suite 'smok'; did you mean 'smoke'?"):
        run(["suite=smoke", "scale=tiny", "+suite.reuse_from=[smok]", f"results_dir={tmp_path}/r"])
    with pytest.raises(ConfigError, match="suite.reuse_from is read by train suites only"):
        run(["suite=flops", "scale=tiny", "+suite.reuse_from=[smoke]", f"results_dir={tmp_path}/r"])
