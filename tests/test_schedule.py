"""Two-stage schedules (tread_bench/methods/schedule.py): a run changes its method's settings at a given step.

Checked here: every bad schedule is one ConfigError line before anything is written; across the boundary an
interrupted and resumed run gives the uninterrupted run's losses exactly (crash before, at and after the
boundary); the scheduled run after the switch equals a run that loads its checkpoint into a network BUILT with the
new settings and trains on; training FLOPs follow the stages (against a hand count); the configuration hash
includes the schedule; the routes column says it."""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch

from tread_bench.core.errors import ConfigError
from tread_bench.data import load_dataset
from tread_bench.training.trainer import Trainer, TrainConfig, TrainingDiverged
from tread_bench.methods import Method, build_network, cumulative_cost, parse_schedule, stage_index, stage_starts
from diffusion import build_objective
from tread_bench.engine.spec import RunSpec, config_hash
from suite_helpers import kill_once_logged, run
from test_token_methods import tiny_macs

ROOT = Path(__file__).resolve().parents[1]

# kind -> (the entry's arguments, the stage's settings): each method's fine-tune (TREAD: another rate)
KINDS = {
    "maskdit": (dict(mask_ratio=0.5, decoder_depth=1, decoder_width=32, decoder_heads=4), {"mask_ratio": 0.0}),
    "sprint": (dict(drop_ratio=0.75), {"drop_ratio": 0.0}),
    "drop": (dict(rate=0.5), {"rate": 0.0}),
    "tread": (dict(routes=["1->3@0.5"]), {"routes": ["1->3@0.25"]}),
}
BOUNDARY, STEPS = 3, 6


def trainer(run_dir, kind, args, schedule=None, steps=STEPS, **cfg):
    data = load_dataset("synthetic", 32, limit=32)
    torch.manual_seed(0)
    net = build_network("dit", "tiny", data.shape, data.num_classes, kind, seed=3, **args)
    return Trainer(build_objective("edm").wrap(net), data,
                   TrainConfig(steps=steps, global_batch=4, log_every=1, lr=1e-3, checkpoint_every=1, **cfg),
                   run_dir, schedule=schedule)


def losses(tr):
    return [s["loss"] for s in tr.stats]


# ------------------------------------------------------------------------------------------------------
# the boundary, resume across it, and the network the stage makes
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_resume_across_the_boundary_is_exact_and_the_stage_is_the_network_built_with_its_settings(kind, tmp_path):
    args, new = KINDS[kind]
    schedule = [{"step": BOUNDARY, **new}]
    whole = trainer(tmp_path / "whole", kind, args, schedule)
    whole.train()
    expected = losses(whole)
    assert len(expected) == STEPS and whole.stages_begun == 1

    # the stage changes training: the same run without the schedule trains the same first steps, then differs
    plain = trainer(tmp_path / "plain", kind, args)
    plain.train()
    assert losses(plain)[:BOUNDARY] == expected[:BOUNDARY]
    assert all(a != b for a, b in zip(losses(plain)[BOUNDARY:], expected[BOUNDARY:]))

    # crash (a NaN at the next step) after the checkpoint of step 2 (before), 3 (at) and 4 (after the boundary)
    for crash_after in (BOUNDARY - 1, BOUNDARY, BOUNDARY + 1):
        run_dir = tmp_path / f"crash{crash_after}"
        with pytest.raises(TrainingDiverged):
            trainer(run_dir, kind, args, schedule, fault_nan_at_step=crash_after + 1).train()
        resumed = trainer(run_dir, kind, args, schedule)
        torch.manual_seed(123)
        resumed.raw.net.set_rng_state(torch.Generator().manual_seed(99).get_state())  # must come from the checkpoint
        assert resumed.try_resume() and resumed.step == crash_after
        past = crash_after >= BOUNDARY
        assert resumed.stages_begun == int(past)  # the stage is applied on resume, before any step
        with torch.device("meta"):
            staged = build_network("dit", "tiny", (1, 32, 32), 4, kind, **({**args, **new} if past else args))
        assert resumed.raw.net.describe() == staged.describe()
        assert resumed.raw.net.tokens_per_block() == staged.tokens_per_block()
        resumed.train()
        assert losses(resumed) == expected, crash_after  # exact: same draws, same state

    # the scheduled run after the switch = its checkpoint at the boundary loaded into a network built with the new
    # settings (no schedule), trained on
    first = trainer(tmp_path / "switch", kind, args, steps=BOUNDARY)
    first.train()
    rebuilt = trainer(tmp_path / "switch", kind, {**args, **new})
    assert rebuilt.try_resume() and rebuilt.step == BOUNDARY
    rebuilt.train()
    assert losses(rebuilt) == expected


def test_stages_are_cumulative_and_applied_once_each(tmp_path):
    args, _ = KINDS["tread"]
    schedule = [{"step": 2, "routes": ["1->3@0.25"]}, {"step": 4, "routes": []}]
    tr = trainer(tmp_path / "r", "tread", args, schedule)
    seen = []
    original = tr.raw.net.apply_settings
    tr.raw.net.apply_settings = lambda **s: (seen.append((tr.step, s)), original(**s))[1]
    tr.train()
    assert seen == [(2, {"routes": ["1->3@0.25"]}), (4, {"routes": []})]
    assert tr.raw.net.describe() == "none" and tr.raw.net.tokens_per_block() == [64] * 6
    assert [stage_index(tr.stages, s) for s in range(7)] == [0, 0, 1, 1, 2, 2, 2]


@pytest.mark.slow
def test_sigkill_past_the_boundary_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """A real kill -9 of the suite process after the fine-tune stage began; the rerun resumes past the boundary."""
    def cmd(tmp):
        return [sys.executable, "run_suite.py", "suite=methods", "scale=tiny", f"results_dir={tmp}/results",
                f"runs_dir={tmp}/runs", "only=dit-tiny-maskdit-seed0", "suite.seeds=[0]", "suite.jobs=1",
                "tracker=none", "suite.train.steps=30", "suite.train.checkpoint_every=5", "suite.train.log_every=5",
                "suite.data.limit=256", "suite.methods.maskdit.schedule=[{step:7,mask_ratio:0.0}]",
                "suite.eval.every=0", "suite.eval.samples=0", "suite.eval.grid_per_class=0", "suite.eval.loss_images=0"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(cmd(clean), cwd=ROOT, env=env, check=True, capture_output=True)
    stats = killed / "runs" / "methods" / "tiny" / "dit-tiny-maskdit-seed0" / "stats.jsonl"
    kill_once_logged(cmd(killed), ROOT, env, stats)  # 3 log lines: step 15 done, the last checkpoint is past step 7
    assert not (killed / "results" / "methods_runs.csv").exists()
    out = subprocess.run(cmd(killed), cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    assert "[dit-tiny-maskdit-seed0] stage 1 of 1 from step 7: mask_ratio=0.0" in out  # re-applied on resume

    def read(tmp):
        path = Path(tmp) / "runs" / "methods" / "tiny" / "dit-tiny-maskdit-seed0" / "stats.jsonl"
        return [json.loads(line)["loss"] for line in path.read_text().splitlines()]

    assert read(killed) == read(clean)
    a = pd.read_csv(clean / "results" / "methods_runs.csv")
    b = pd.read_csv(killed / "results" / "methods_runs.csv")
    assert a.final_loss.tolist() == b.final_loss.tolist() and a.train_flops.tolist() == b.train_flops.tolist()


# ------------------------------------------------------------------------------------------------------
# FLOPs follow the stages
# ------------------------------------------------------------------------------------------------------

def test_cumulative_cost_by_hand():
    starts = stage_starts(parse_schedule([{"step": 3, "rate": 0.0}, {"step": 5, "rate": 0.25}]))
    assert starts == [0, 3, 5]
    costs = [10.0, 40.0, 25.0]
    by_hand = {0: 0.0, 1: 10.0, 3: 30.0, 4: 30.0 + 40.0, 5: 30.0 + 80.0, 8: 30.0 + 80.0 + 3 * 25.0}
    for step, value in by_hand.items():
        assert cumulative_cost(step, starts, costs) == value
        assert cumulative_cost(step, starts, costs, units_per_step=16) == 16 * value
    assert cumulative_cost(7, [0], [2.5], units_per_step=4) == 2.5 * 28  # one stage: cost x images seen


def test_train_flops_column_follows_the_stages_against_a_hand_count(tmp_path):
    """MaskDiT on the tiny DiT, masked (32 of 64 tokens) for 6 steps then unmasked: the table's cumulative training
    FLOPs at every evaluation = batch 16 x 3 x (steps in each stage x that stage's forward MACs), the forward MACs
    from test_token_methods' hand count (fvcore convention, decoder included)."""
    r = tmp_path / "r"
    assert run(["suite=methods", "scale=tiny", f"results_dir={r}", f"runs_dir={tmp_path}/runs", "tracker=none",
                "only=maskdit", "suite.backbones=[{name:dit}]", "suite.seeds=[0]", "suite.jobs=1",
                "suite.data.limit=64", "suite.eval.every=2", "suite.eval.samples=0", "suite.eval.grid_per_class=0"]) == 0
    # the tiny decoder is 2 x 32 (1/3 of 6 blocks, 5/12 of width 64 in heads of 32): test_token_methods' DECODER's
    # MACs (its 4 heads of 8 cost what 1 head of 32 costs)
    table = pd.read_csv(r / "methods_runs.csv").set_index("step")
    masked, unmasked = 3 * tiny_macs("maskdit", 32, norms=True), 3 * tiny_macs("maskdit", 64, norms=True)
    assert unmasked > masked
    for step in (2, 4, 6, 8):
        by_hand = 16 * (min(step, 6) * masked + max(0, step - 6) * unmasked)
        assert table.loc[step, "train_flops"] == pytest.approx(by_hand, rel=1e-12)
    assert table.setting.iloc[0] == "maskdit@0.5, decoder 2x32, mae 0.1; from step 6: maskdit@0"


def test_plan_sums_the_stages_and_takes_the_largest_memory(tmp_path, capsys):
    from tread_bench.engine.plan import plan_row
    from suite_helpers import compose_suite
    import tread_bench.engine

    cfg = compose_suite(["suite=methods", "scale=tiny"])  # the tiny decoder: 2 x 32
    suite = tread_bench.engine.resolve_suite(cfg)
    (maskdit,) = [r for r in tread_bench.engine.expand_runs(suite, cfg.scale) if r.run_id == "dit-tiny-maskdit" and r.seed == 0]
    row = plan_row(maskdit, suite, (1, 32, 32), 10, 1, 0.4)
    masked, unmasked = 3 * tiny_macs("maskdit", 32, norms=False), 3 * tiny_macs("maskdit", 64, norms=False)
    assert row["total_train_flops"] == 16 * (6 * masked + 2 * unmasked)  # the torch counter: no norms
    assert row["train_gflops_per_image"] * 1e9 == pytest.approx((6 * masked + 2 * unmasked) / 8, rel=1e-12)
    unscheduled = maskdit.__class__(**{**asdict(maskdit), "schedule": []})
    masked_only = plan_row(unscheduled, suite, (1, 32, 32), 10, 1, 0.4)
    assert masked_only["total_train_flops"] == 16 * 8 * masked
    # the dense stage: the backbone's 6 blocks x 64 tokens x width 64 plus the decoder's 2 x 64 tokens x width 32,
    # against 6 x 32 x 64 + 2 x 64 x 32 masked
    dense, sparse = 6 * 64 * 64 + 2 * 64 * 32, 6 * 32 * 64 + 2 * 64 * 32
    assert row["mem_activations_gib"] == pytest.approx(dense / sparse * masked_only["mem_activations_gib"])


# ------------------------------------------------------------------------------------------------------
# bad schedules: one line, before anything is written
# ------------------------------------------------------------------------------------------------------

M = "suite.methods.maskdit.schedule"
BAD = [
    (f"{M}=[{{step:8,mask_ratio:0.0}}]", f"{M}[0].step = 8 is not below the run's 8 training steps, so the stage "
     "would never train; use a step in [1, 7] or train longer"),
    (f"{M}=[{{step:0,mask_ratio:0.0}}]", f"{M}[0].step = 0 must be >= 1 (step 0 is the entry's own settings: set "
     "them there)"),
    (f"{M}=[{{step:5,mask_ratio:0.2}},{{step:4,mask_ratio:0.0}}]", f"{M}[1].step = 4 must be greater than the "
     "previous stage's step 5; list the stages in increasing step order"),
    (f"{M}=[{{step:4,mask_ratio:0.2}},{{step:4,mask_ratio:0.0}}]", f"{M}[1].step = 4 must be greater than the "
     "previous stage's step 4; list the stages in increasing step order"),
    (f"{M}=[{{step:half,mask_ratio:0.0}}]", f"{M}[0].step = 'half' must be a whole number of training steps (the "
     "stage begins after that many steps); e.g. step: 1600"),
    (f"{M}=[{{step:4}}]", f"{M}[0] changes nothing; name the settings this stage sets, e.g. "
     "{step: 4, mask_ratio: 0.0}"),
    ("+suite.methods.drop.schedule={step:4,rate:0.0}", "suite.methods.drop.schedule must be a list of stages such "
     "as [{step: 1600, mask_ratio: 0.0}], got {'step': 4, 'rate': 0.0}"),
    (f"{M}=[{{step:4,mask_ratios:0.0}}]", f"{M}[0]: a method of kind maskdit cannot change mask_ratios during a run; "
     "its schedule may change: mask_ratio"),
    (f"{M}=[{{step:4,decoder_depth:2}}]", f"{M}[0]: a method of kind maskdit cannot change decoder_depth during a "
     "run; its schedule may change: mask_ratio"),
    ("+suite.methods.tread.schedule=[{step:4,rate:0.0}]", "suite.methods.tread.schedule[0]: a method of kind tread "
     "cannot change rate during a run; its schedule may change: routes"),
    # values: checked by the method itself on a meta-device network, before training
    (f"{M}=[{{step:4,mask_ratio:1.5}}]", f"{M}[0] (step 4): maskdit: mask_ratio = 1.5 must be a number in [0, 1) "
     "(the fraction of tokens dropped); e.g. mask_ratio: 0.5"),
    ("suite.methods.sprint.schedule=[{step:4,drop_ratio:0.3}]", "suite.methods.sprint.schedule[0] (step 4): sprint: "
     "drop ratio 0.3 cannot be made by structured grouping on the 8x8 token grid (each g x g group keeps k tokens, "
     "so the ratio must be 1 - k/g^2; g=2: 0.25, 0.5, 0.75; g=4: a multiple of 1/16); choose such a drop_ratio or "
     "grouping: random"),
    ('+suite.methods.tread.schedule=[{step:4,routes:["1->9@0.5"]}]', "suite.methods.tread.schedule[0] (step 4): "
     "route r(1->9)@0.5: end 9 is beyond the last block 5; use end <= 5"),
    ("+suite.methods.drop.schedule=[{step:4,rate:0.0,start:6}]", "suite.methods.drop.schedule[0] (step 4): drop: "
     "start = 6 must be a block index in [0, 5] (the first block that sees only the kept tokens); e.g. start: 0"),
]


@pytest.mark.parametrize("override, message", BAD)
def test_bad_schedules_are_one_line_before_anything_is_written(override, message, tmp_path):
    method = override.split(".")[2]
    with pytest.raises(ConfigError) as err:
        run(["suite=methods", "scale=tiny", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs", "tracker=none",
             f"only=dit-tiny-{method}-seed0", "suite.data.limit=64", override])
    assert str(err.value) == message
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


def test_the_command_line_says_it_in_one_line_and_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "run_suite.py", "suite=methods", "scale=tiny", f"results_dir={tmp_path}/r",
                          f"runs_dir={tmp_path}/runs", f"{M}=[{{step:8,mask_ratio:0.0}}]"],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"error: {BAD[0][1]}"
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


def test_a_method_without_schedulable_settings_refuses_any():
    class Fixed(Method):  # a plug-in that overrides nothing of the schedule interface
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

    with torch.device("meta"):
        net = Fixed(build_network("dit", "tiny", (1, 32, 32), 4, routes=[]).backbone)
    net.apply_settings()  # nothing to change: fine
    with pytest.raises(ConfigError, match="^method Fixed cannot change rate during a run; it has no settings a "
                                          "schedule can change$"):
        net.apply_settings(rate=0.0)
    with pytest.raises(ConfigError, match="^method sprint cannot change dense_head during a run; its schedule may "
                                          "change: drop_ratio, path_drop_prob$"):
        build_network("dit", "tiny", (1, 32, 32), 4, "sprint").apply_settings(dense_head=1)


def test_a_refused_value_changes_nothing():
    net = build_network("dit", "tiny", (1, 32, 32), 4, "sprint", drop_ratio=0.75)
    with pytest.raises(ConfigError):
        net.apply_settings(path_drop_prob=0.0, drop_ratio=0.3)  # the second is impossible: neither applies
    assert (net.drop_ratio, net.path_drop_prob, net.selection) == (0.75, 0.1, "structured")
    drop = build_network("dit", "tiny", (1, 32, 32), 4, "drop", rate=0.5)
    with pytest.raises(ConfigError):
        drop.apply_settings(rate=0.0, start=9)
    assert (drop.rate, drop.start) == (0.5, 0)


# ------------------------------------------------------------------------------------------------------
# the configuration hash and the setting column
# ------------------------------------------------------------------------------------------------------

def test_the_configuration_hash_includes_the_schedule_and_the_method_arguments():
    spec = RunSpec("methods", "tiny", "dit", "tiny", "maskdit", "maskdit", {"mask_ratio": 0.5})
    plain = asdict(spec)
    assert config_hash({"run": plain}) != config_hash({"run": {**plain, "args": {"mask_ratio": 0.25}}})
    hashes = {config_hash({"run": plain})}
    for schedule in ([{"step": 6, "mask_ratio": 0.0}], [{"step": 5, "mask_ratio": 0.0}],
                     [{"step": 6, "mask_ratio": 0.1}]):
        hashes.add(config_hash({"run": {**plain, "schedule": schedule}}))
    assert len(hashes) == 4


def test_the_setting_column_says_the_schedule():
    import tread_bench.engine
    from suite_helpers import compose_suite

    cfg = compose_suite(["suite=methods", "scale=full"])
    runs = {r.run_id: r for r in tread_bench.engine.expand_runs(tread_bench.engine.resolve_suite(cfg), cfg.scale)}
    expected = {
        "dit-B2-maskdit": "maskdit@0.5, decoder 4x320, mae 0.1; from step 384000: maskdit@0",
        "dit-B2-sprint": "sprint(2->9)@0.75, path drop 0.1; from step 360000: sprint(2->9)@0",
        "mamba-B2-sprint": "sprint(2->9)@0.75, path drop 0.1; from step 360000: sprint(2->9)@0",
        "dit-B2-tread": "r(2->8)@0.5", "dit-B2-drop": "drop(0->11)@0.5",
    }
    selections = {}
    for run_id, text in expected.items():
        r = runs[run_id]
        model = tread_bench.engine.validate_run(r, (4, 32, 32), 1000)
        assert r.setting == text
        assert model.net.describe() == text.split(";")[0]  # the returned network is at the entry's own settings
        selections[run_id] = model.net.selection
    assert selections["mamba-B2-sprint"] == "subgrid" and selections["dit-B2-sprint"] == "structured"
