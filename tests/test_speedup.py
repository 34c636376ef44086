"""Speedup computation on synthetic curves with answers worked by hand."""
import pandas as pd
import pytest

from measure.speedup import NOT_REACHED, convergence_speedup, speedup_table, time_to_reach


def test_time_to_reach_interpolates_linearly():
    # FID 50 at t=10, 30 at t=20: FID 40 is reached halfway, at t=15
    assert time_to_reach([10, 20, 30], [50, 30, 20], 40) == pytest.approx(15.0)
    assert time_to_reach([10, 20], [50, 30], 30) == pytest.approx(20.0)
    assert time_to_reach([10, 20], [50, 30], 10) is None


def test_convergence_speedup_known_answer():
    # baseline reaches its best FID 20 at t=100; TREAD: 40 at t=10, 10 at t=30 -> FID 20 at t=10+20*(20/30)
    speed, best, t_base, t_tread = convergence_speedup([25, 50, 100], [60, 35, 20], [10, 30], [40, 10])
    assert best == 20 and t_base == 100
    assert t_tread == pytest.approx(10 + 20 * (20 / 30))
    assert speed == pytest.approx(100 / (10 + 20 * 2 / 3))


def test_not_reached():
    speed, *_ = convergence_speedup([1, 2], [30, 20], [1, 2], [40, 25])
    assert speed == NOT_REACHED


def test_speedup_table_rows():
    runs = pd.DataFrame([
        # baseline: 2 s/step, 10 FLOPs/step; tread: 1.6 s/step, 7 FLOPs/step
        dict(backbone="dit", size="S/2", method="baseline", step=100, wall_time_s=200, train_flops=1000, fid=50.0),
        dict(backbone="dit", size="S/2", method="baseline", step=200, wall_time_s=400, train_flops=2000, fid=40.0),
        dict(backbone="dit", size="S/2", method="tread", step=100, wall_time_s=160, train_flops=700, fid=42.0),
        dict(backbone="dit", size="S/2", method="tread", step=200, wall_time_s=320, train_flops=1400, fid=30.0),
    ])
    row = speedup_table(runs).iloc[0]
    assert row.flop_ratio == pytest.approx(10 / 7)
    assert row.iteration_speedup == pytest.approx(2 / 1.6)
    assert (row.equal_step, row.fid_baseline, row.fid_method) == (200, 40.0, 30.0)
    # baseline best 40 at t=400; tread reaches 40 between (160, 42) and (320, 30): t = 160 + 160 * 2/12
    assert row.convergence_speedup_time == pytest.approx(400 / (160 + 160 * 2 / 12))
    assert row.convergence_speedup_flops == pytest.approx(2000 / (700 + 700 * 2 / 12))
