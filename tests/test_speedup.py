"""Seeded speedup tables on synthetic curves with answers worked by hand."""
import math

import pandas as pd
import pytest

from tread_bench.measure.speedup import speedup_markdown, speedup_table, time_to_reach, value_at


def test_time_to_reach_interpolates_linearly():
    # value 50 at t=10, 30 at t=20: 40 is reached halfway, at t=15
    assert time_to_reach([10, 20, 30], [50, 30, 20], 40) == pytest.approx(15.0)
    assert time_to_reach([10, 20], [50, 30], 30) == pytest.approx(20.0)
    assert time_to_reach([10, 20], [50, 30], 10) is None


def curve(method, seed, steps, walls, flops_per_step, losses, fids=None):
    fids = fids or [None] * len(steps)
    return [dict(backbone="dit", size="S/2", method=method, seed=seed, step=s, wall_time_s=w,
                 train_flops=flops_per_step * s, eval_loss=l, fid=f)
            for s, w, l, f in zip(steps, walls, losses, fids)]


def test_one_seed_pair_by_hand():
    # baseline: 2 s/step, 10 FLOPs/step, final eval loss 0.40 at step 200;
    # tread: 1.6 s/step, 7 FLOPs/step; loss 0.42 at step 100, 0.30 at 200 -> 0.40 at step 100 + 100 * 2/12
    rows = (curve("baseline", 0, [100, 200], [200, 400], 10, [0.50, 0.40], [50.0, 40.0])
            + curve("tread", 0, [100, 200], [160, 320], 7, [0.42, 0.30], [42.0, 30.0]))
    row = speedup_table(pd.DataFrame(rows)).iloc[0]
    assert row.seeds == 1 and row.equal_step == 200
    assert row.flop_ratio == pytest.approx(10 / 7)
    assert row.iteration_speedup == pytest.approx(2 / 1.6)
    assert (row.eval_loss_baseline, row.eval_loss_method) == (0.40, 0.30)
    assert row.eval_loss_diff == pytest.approx(-0.10)
    step_at = 100 + 100 * 2 / 12
    assert row.loss_speedup_steps == pytest.approx(200 / step_at)
    assert row.loss_speedup_flops == pytest.approx(2000 / (7 * step_at))
    assert row.loss_speedup_time == pytest.approx(400 / (1.6 * step_at))
    assert row.loss_reached == "1/1"
    assert row.fid_speedup_steps == pytest.approx(200 / step_at)  # FID 40 -> same crossing (42 -> 30)
    # tread's final 0.30 is below anything the baseline reached: no cost ratio; at tread's final FLOPs
    # (1400) the baseline's curve (1000 -> 0.50, 2000 -> 0.40) reads 0.46; at tread's final 320 s the
    # baseline's curve (200 s -> 0.50, 400 s -> 0.40) reads 0.44
    assert math.isnan(row.loss_cost_ratio_flops)
    assert row.eval_loss_diff_equal_flops == pytest.approx(0.30 - 0.46)
    assert row.eval_loss_diff_equal_time == pytest.approx(0.30 - 0.44)


def test_equal_compute_when_the_method_is_behind_at_equal_steps():
    # baseline 10 FLOPs/step, loss 0.50 @100, 0.40 @200, 0.36 @300; tread 5 FLOPs/step, 0.48 @300 (1500 FLOPs).
    # Baseline reaches 0.48 at step 100 + 100 * 0.02/0.10 = 120 -> 1200 FLOPs: cost ratio 1200 / 1500 = 0.8.
    # At 1500 FLOPs (step 150) the baseline reads 0.45: diff 0.48 - 0.45 = +0.03 (tread worse at equal FLOPs).
    rows = (curve("baseline", 0, [100, 200, 300], [100, 200, 300], 10, [0.50, 0.40, 0.36])
            + curve("tread", 0, [100, 200, 300], [50, 100, 150], 5, [0.60, 0.52, 0.48]))
    row = speedup_table(pd.DataFrame(rows)).iloc[0]
    assert row.loss_cost_ratio_flops == pytest.approx(0.8)
    assert row.eval_loss_diff_equal_flops == pytest.approx(0.03)
    # time: tread's 150 s -> baseline at 150 s reads 0.45 as well; baseline reaches 0.48 at 120 s: 120/150
    assert row.loss_cost_ratio_time == pytest.approx(0.8)
    assert row.eval_loss_diff_equal_time == pytest.approx(0.03)


def test_value_at_interpolates_and_never_extrapolates():
    assert value_at([10, 20], [1.0, 2.0], 15) == pytest.approx(1.5)
    assert math.isnan(value_at([10, 20], [1.0, 2.0], 25)) and math.isnan(value_at([10, 20], [1.0, 2.0], 5))


def test_three_seed_pairs_summarised_with_t_interval():
    # step speedups per pair 1.0, 1.25, 1.5 (baseline 2 s/step; tread 2, 1.6, 1.333.. s/step):
    # mean 1.25, sd 0.25, half-width 4.302653 * 0.25 / sqrt(3)
    rows = []
    for seed, tread_wall in enumerate([200.0, 160.0, 400 / 3]):
        rows += curve("baseline", seed, [50, 100], [100, 200], 10, [0.5, 0.4])
        rows += curve("tread", seed, [50, 100], [tread_wall / 2, tread_wall], 7, [0.6, 0.5])
    row = speedup_table(pd.DataFrame(rows)).iloc[0]
    assert row.seeds == 3
    assert row.iteration_speedup == pytest.approx(1.25)
    assert row.iteration_speedup_ci95 == pytest.approx(4.302653 * 0.25 / math.sqrt(3), rel=1e-5)
    assert row.loss_reached == "0/3" and math.isnan(row.loss_speedup_steps)  # tread never gets to 0.4
    assert row.eval_loss_diff == pytest.approx(0.1)
    md = speedup_markdown(pd.DataFrame([row]))
    assert md["step speedup"].iloc[0] == "1.25 ± 0.62"


def test_one_fid_point_gives_no_fid_speedup():
    rows = (curve("baseline", 0, [100, 200], [200, 400], 10, [0.5, 0.4], [None, 40.0])
            + curve("tread", 0, [100, 200], [160, 320], 7, [0.45, 0.35], [None, 35.0]))
    row = speedup_table(pd.DataFrame(rows)).iloc[0]
    assert row.fid_diff == pytest.approx(-5.0)
    assert "fid_speedup_steps" not in row or math.isnan(row.fid_speedup_steps)


def test_curve_legends_name_each_method_with_its_setting(tmp_path, monkeypatch):
    import matplotlib.figure

    from tread_bench.measure.speedup import plot_curves

    legends = []

    def savefig(fig, path, **kw):
        legends.extend(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    rows = [{"backbone": "dit", "size": "XS/4", "method": m, "setting": setting, "seed": seed, "step": step,
             "train_flops": step * 1e12, "wall_time_s": step, "eval_loss": 1.0 / step + seed * 1e-3}
            for m, setting in (("baseline", "none"), ("tread", "r(2->8)@0.5")) for seed in (0, 1)
            for step in (1, 2, 3)]
    assert plot_curves(pd.DataFrame(rows), str(tmp_path / "curves")) == [str(tmp_path / "curves_dit-XS4.png")]
    assert set(legends) == {"baseline (n=2)", "tread r(2->8)@0.5 (n=2)"}
