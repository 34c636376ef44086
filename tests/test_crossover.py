"""suite=crossover at scale=tiny: every file kind (runs table, cells table, trend, map), the cells' ratios against
the runs table read by hand, equal FLOPs read off two evaluations (no interpolation), and cells that differ only
in batch or only in training length kept apart."""
import math

import pandas as pd
import pytest

from tread_bench.measure.crossover import cell_shape, crossover_cells, pair_points, trend_of, verdict_lines
from suite_helpers import run


def test_the_tiny_crossover_suite_writes_its_runs_cells_trend_and_map(tmp_path, capsys):
    out = tmp_path / "r"
    assert run(["suite=crossover", "scale=tiny", f"results_dir={out}", f"runs_dir={tmp_path}/runs"]) == 0
    for name in ("crossover_runs.csv", "crossover_cells.csv", "crossover_trend.md", "crossover_map.png",
                 "crossover_speedup.csv"):
        assert (out / name).exists(), name
    runs, cells = pd.read_csv(out / "crossover_runs.csv"), pd.read_csv(out / "crossover_cells.csv")
    assert set(cells["size"]) == {"XS/4", "w128/4", "w192/4", "XS/2"} and set(cells.tokens) == {64, 256}
    assert set(cells.width) == {64, 128, 192}
    final = cells[(cells["size"] == "XS/2") & (cells.step == 20)].iloc[0]
    at = runs[(runs["size"] == "XS/2") & (runs.step == 20)]
    by_hand = [at[(at.method == "tread") & (at.seed == s)].eval_loss.item()
               / at[(at.method == "baseline") & (at.seed == s)].eval_loss.item() for s in (0, 1)]
    assert final.ratio_equal_steps == pytest.approx(sum(by_hand) / 2, rel=1e-12)
    assert final.seed_pairs == 2 and math.isfinite(final.fid_diff_equal_steps)
    # eval.flop_match: the baseline also evaluated where its training FLOPs equal TREAD's at steps 10 and 20
    for size in ("XS/4", "XS/2"):
        mine = runs[(runs["size"] == size) & (runs.seed == 0)]
        base, tread = mine[mine.method == "baseline"], mine[mine.method == "tread"]
        per_step = base.train_flops.iloc[-1] / base.step.iloc[-1]
        assert set(tread.step) == {10, 20} and len(set(base.step)) > 2
        for flops in tread.train_flops:
            assert (base.train_flops - flops).abs().min() <= per_step / 2
    row = cells[(cells["size"] == "XS/2") & (cells.step == 20)].iloc[0]
    ratios = []
    for s in (0, 1):
        mine = runs[(runs["size"] == "XS/2") & (runs.seed == s)]
        t = mine[(mine.method == "tread") & (mine.step == 20)].iloc[0]
        b = mine[mine.method == "baseline"]
        ratios.append(t.eval_loss / b.loc[(b.train_flops - t.train_flops).abs().idxmin()].eval_loss)
    assert row.ratio_equal_flops == pytest.approx(sum(ratios) / 2, rel=1e-12)
    # report=true: every unit (a cell's seed pair) by the runs table; a missing one with the command that runs it
    runs[~((runs["size"] == "XS/2") & (runs.seed == 1) & (runs.method == "tread"))].to_csv(
        out / "crossover_runs.csv", index=False)
    capsys.readouterr()
    assert run(["suite=crossover", "scale=tiny", f"results_dir={out}", f"runs_dir={tmp_path}/empty", "report=true"]) == 0
    said = capsys.readouterr().out
    assert "  done     dit-XS4-seed0\n" in said and "  done     dit-XS2-seed0\n" in said
    assert (f"  missing  dit-XS2-seed1 (tread): python run_suite.py suite=crossover scale=tiny only=dit-XS2-tread "
            f"'suite.seeds=[1]' results_dir={out}\n") in said
    assert "7 of 8 units done" in said


def _rows(cell_size="tiny", batch=32, steps=(100, 200), total=200, seed=0, base_losses=(2.0, 1.0),
          tread_losses=(2.1, 1.2), base_flops=(100, 200), tread_flops=(75, 150)):
    rows = []
    for method, flops, losses in (("baseline", base_flops, base_losses), ("tread", tread_flops, tread_losses)):
        for step, f, loss in zip(steps, flops, losses):
            rows.append({"backbone": "dit", "size": cell_size, "method": method, "seed": seed, "step": step,
                         "steps": total, "images_seen": step * batch, "status": "ok", "train_flops": f,
                         "eval_loss": loss, "params": 10})
    return rows


def test_equal_flops_reads_an_evaluation_never_an_interpolated_curve():
    # baseline evaluated at steps 100, 200 (1 FLOP a step); TREAD at step 200 spent 150 FLOPs with loss 1.2. No
    # baseline evaluation at 150 FLOPs: no equal-FLOPs ratio (a straight line through 2.0 and 1.0 would say 0.8).
    cells = crossover_cells(pd.DataFrame(_rows()))
    last = cells[cells.step == 200].iloc[0]
    assert last.ratio_equal_steps == pytest.approx(1.2) and math.isnan(last.ratio_equal_flops)
    # with the baseline also evaluated at step 300 (300 FLOPs), where TREAD's step 400 lands: 1.1 / 1.4
    rows = _rows(steps=(200, 300, 400), total=400, base_losses=(2.0, 1.4, 1.0), base_flops=(200, 300, 400),
                 tread_losses=(2.1, 1.2, 1.1), tread_flops=(150, 225, 300))
    cells = crossover_cells(pd.DataFrame(rows))
    assert cells[cells.step == 400].ratio_equal_flops.iloc[0] == pytest.approx(1.1 / 1.4)
    points = pair_points(pd.DataFrame(rows))
    assert points[points.step == 400].baseline_step_equal_flops.iloc[0] == 300


def test_cells_that_differ_only_in_batch_or_length_stay_apart_in_the_table_and_the_fit():
    rows = []
    for seed in range(3):
        noise = 0.01 * (seed - 1)
        rows += _rows(seed=seed, batch=32, steps=(900, 1800), total=1800, tread_losses=(1.1 + noise, 1.05 + noise))
        rows += _rows(seed=seed, batch=128, steps=(900, 1800), total=1800, tread_losses=(1.05 + noise, 1.0 + noise))
        rows += _rows(seed=seed, batch=32, steps=(900, 1800, 3600), total=3600, base_flops=(900, 1800, 3600),
                      base_losses=(1.0, 1.0, 1.0), tread_flops=(600, 1200, 2400), tread_losses=(1.1 + noise, 1.0, 0.95))
    for r in rows:
        r["size"] = "XS/4"
    runs = pd.DataFrame(rows)
    cells = crossover_cells(runs, ema_decay=0.9)
    assert set(cells.cell) == {"dit XS/4 b32 1800", "dit XS/4 b128 1800", "dit XS/4 b32 3600"}
    at_1800 = cells[cells.step == 1800].set_index("cell").ratio_equal_steps
    assert at_1800["dit XS/4 b32 1800"] == pytest.approx(1.05 / 1.0)  # baseline loss 1.0 at step 1800
    assert at_1800["dit XS/4 b128 1800"] == pytest.approx(1.0) and at_1800["dit XS/4 b32 3600"] == pytest.approx(1.0)
    trend = trend_of(pair_points(runs), cells)
    assert trend.clusters == 9 and "tokens_per_step" in trend.terms and "step" in trend.terms
    # a cell of one seed pair is tabled but stays out of the fit: it alone would set its axis's slope
    lone = [{**r, "size": "w192/4", "params": 90} for r in _rows(seed=0, steps=(900, 1800), total=1800)]
    with_lone = pd.concat([runs, pd.DataFrame(lone)], ignore_index=True)
    cells = crossover_cells(with_lone, ema_decay=0.9)
    assert "dit w192/4 b32 1800" in set(cells.cell)
    assert trend_of(pair_points(with_lone), cells).clusters == 9


def test_the_ema_warmup_stays_out_of_the_trend():
    rows = []
    for seed in range(3):
        rows += _rows(seed=seed, steps=(300, 900, 1800), total=1800, base_flops=(300, 900, 1800), tread_flops=(200, 600, 1200),
                      base_losses=(1.0, 1.0, 1.0), tread_losses=(5.0, 1.0 + 0.01 * seed, 1.0 + 0.01 * seed))
    runs = pd.DataFrame(rows)
    cells = crossover_cells(runs, ema_decay=0.995)  # 0.995^300 = 22% > 2%: warm-up; 0.995^900 = 1.1%
    assert list(cells.ema_warmup) == [True, False, False]
    trend = trend_of(pair_points(runs), cells)
    assert trend.points == 6 and trend.terms == ["intercept", "step"]
    assert trend.coef[1] == pytest.approx(0, abs=1e-12)  # the warm-up's 5.0 would tilt it


def test_at_equal_flops_the_baselines_earlier_step_inside_the_warmup_leaves_the_fit():
    # TREAD at steps 900 / 1500 / 1800 spent 600 / 1000 / 1200 FLOPs: the baseline's matched steps. 0.995^600 = 4.9%
    # is inside the warm-up (TREAD's 900 is not: 1.1%), 0.995^1000 = 0.67% and 0.995^1200 = 0.24% are not.
    rows = []
    for seed in range(3):
        common = {"backbone": "dit", "size": "tiny", "seed": seed, "steps": 1800, "status": "ok", "params": 10}
        for step in (600, 900, 1000, 1200, 1500, 1800):
            rows.append({**common, "method": "baseline", "step": step, "images_seen": step * 32, "train_flops": step,
                         "eval_loss": 1.0})
        for step, flops in ((900, 600), (1500, 1000), (1800, 1200)):
            rows.append({**common, "method": "tread", "step": step, "images_seen": step * 32, "train_flops": flops,
                         "eval_loss": 1.0 + 0.01 * seed})
    runs = pd.DataFrame(rows)
    cells = crossover_cells(runs, ema_decay=0.995)
    assert list(cells.baseline_step_equal_flops) == [600, 1000, 1200]
    assert list(cells.ema_warmup) == [False, False, False]
    assert list(cells.ema_warmup_equal_flops) == [True, False, False]
    points = pair_points(runs)
    assert trend_of(points, cells, "ratio_equal_steps").points == 9
    assert trend_of(points, cells, "ratio_equal_flops").points == 6


def _verdict_runs(baseline_fid_at_150=None):
    """3 seed pairs: the baseline evaluated at steps 150 (150 FLOPs) and 200 (200 FLOPs), loss 1.2 and 1.0, FID 45
    at step 200; TREAD at step 200 spent 150 FLOPs, loss 1.09 / 1.10 / 1.11 and FID 50 / 51 / 52 by seed."""
    rows = []
    for seed in range(3):
        common = {"backbone": "dit", "size": "tiny", "seed": seed, "steps": 200, "status": "ok", "params": 10}
        rows.append({**common, "method": "baseline", "step": 150, "images_seen": 150 * 32, "train_flops": 150,
                     "eval_loss": 1.2, "fid": math.nan if baseline_fid_at_150 is None else baseline_fid_at_150})
        rows.append({**common, "method": "baseline", "step": 200, "images_seen": 200 * 32, "train_flops": 200,
                     "eval_loss": 1.0, "fid": 45.0})
        rows.append({**common, "method": "tread", "step": 200, "images_seen": 200 * 32, "train_flops": 150,
                     "eval_loss": 1.10 + 0.01 * (seed - 1), "fid": 51.0 + (seed - 1)})
    return pd.DataFrame(rows)


def test_the_verdict_needs_loss_and_fid_to_agree_at_equal_steps_and_at_equal_flops():
    # t(0.975, 2) = 4.303, sd of 3 values 1 apart (in units of the last digit) = 1: half-width 4.303 / sqrt(3) = 2.48
    cells = crossover_cells(_verdict_runs(), ema_decay=0.9)
    (line,) = verdict_lines(cells)
    # equal steps: ratio 1.10 ± 0.025 (the loss over 1.0), FID +6 ± 2.5: both say worse
    assert ("at equal steps, loss ratio 1.1 ± 0.025 (TREAD worse), FID difference 6 ± 2.5 (TREAD worse): "
            "TREAD does not pay;") in line
    # equal FLOPs: ratio 1.10 / 1.2 = 0.917 ± 0.021 better; the baseline has no FID at step 150: unconfirmed
    assert ("at equal training FLOPs, loss ratio 0.917 ± 0.021 (TREAD better), FID difference – (not measured): "
            "the loss says TREAD pays, unconfirmed") in line
    # with the baseline's FID 60 at step 150: -10 / -9 / -8, -9 ± 2.5: both say better
    (line,) = verdict_lines(crossover_cells(_verdict_runs(baseline_fid_at_150=60.0), ema_decay=0.9))
    assert "FID difference -9 ± 2.5 (TREAD better): TREAD pays." in line
    # FID that does not confirm a loss that says better: no crossover on the loss alone
    (line,) = verdict_lines(crossover_cells(_verdict_runs(baseline_fid_at_150=51.0), ema_decay=0.9))
    assert "FID difference 0 ± 2.5 (undecided): the loss says TREAD pays, FID does not confirm it." in line


def test_cell_shapes_are_read_off_the_networks():
    assert cell_shape("dit", "XS/4") == (64, 64) and cell_shape("dit", "XS/2") == (64, 256)
    assert cell_shape("dit", "w128/4") == (128, 64) and cell_shape("dit", "w192/4") == (192, 64)
