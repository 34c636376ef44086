"""suite=crossover at scale=tiny: every file kind (runs table, cells table, trend, map), and the cells' ratios
against the runs table read by hand."""
import math

import pandas as pd
import pytest

from tread_bench.measure.crossover import cell_shape, crossover_cells
from suite_helpers import run


def test_the_tiny_crossover_suite_writes_its_runs_cells_trend_and_map(tmp_path):
    out = tmp_path / "r"
    assert run(["suite=crossover", "scale=tiny", f"results_dir={out}", f"runs_dir={tmp_path}/runs"]) == 0
    for name in ("crossover_runs.csv", "crossover_cells.csv", "crossover_trend.md", "crossover_map.png",
                 "crossover_speedup.csv"):
        assert (out / name).exists(), name
    runs, cells = pd.read_csv(out / "crossover_runs.csv"), pd.read_csv(out / "crossover_cells.csv")
    assert set(cells["size"]) == {"tiny", "tiny/2"} and set(cells.tokens) == {64, 256} and set(cells.width) == {64}
    final = cells[(cells["size"] == "tiny/2") & (cells.step == 20)].iloc[0]
    at = runs[(runs["size"] == "tiny/2") & (runs.step == 20)]
    by_hand = [at[(at.method == "tread") & (at.seed == s)].eval_loss.item()
               / at[(at.method == "baseline") & (at.seed == s)].eval_loss.item() for s in (0, 1)]
    assert final.ratio_equal_steps == pytest.approx(sum(by_hand) / 2, rel=1e-12)
    assert final.seeds == 2 and math.isfinite(final.fid_diff)


def test_equal_flops_compares_with_the_baselines_curve_at_treads_flops():
    # baseline: loss 2.0 at 100 FLOPs, 1.0 at 200; TREAD at step 2 spent 150 FLOPs with loss 1.2:
    # the baseline's curve at 150 FLOPs is 1.5, so the equal-FLOPs ratio is 1.2 / 1.5 = 0.8 (steps: 1.2 / 1.0)
    rows = []
    for method, flops, losses in (("baseline", (100, 200), (2.0, 1.0)), ("tread", (75, 150), (2.1, 1.2))):
        for step, f, loss in zip((1, 2), flops, losses):
            rows.append({"backbone": "dit", "size": "tiny", "method": method, "seed": 0, "step": step, "status": "ok",
                         "train_flops": f, "eval_loss": loss, "params": 10})
    cells = crossover_cells(pd.DataFrame(rows))
    last = cells[cells.step == 2].iloc[0]
    assert last.ratio_equal_steps == pytest.approx(1.2) and last.ratio_equal_flops == pytest.approx(0.8)
    assert math.isnan(cells[cells.step == 1].ratio_equal_flops.iloc[0])  # 75 FLOPs: before the baseline's curve


def test_cell_shapes_are_read_off_the_networks():
    assert cell_shape("dit", "XS/4") == (64, 64) and cell_shape("dit", "XS/2") == (64, 256)
    assert cell_shape("dit", "w128/4") == (128, 64) and cell_shape("dit", "w192/4") == (192, 64)


def test_the_trend_predicts_at_the_papers_point_only_when_every_axis_varies():
    from tread_bench.measure.crossover import trend_markdown

    # ratio = 1.2 * (params / 1e6)^-0.05 * (tokens / 64)^-0.02 * (step / 1800)^-0.01, with a little noise:
    # at 33M parameters, 256 tokens, 400K steps it is 1.2 * 0.839 * 0.973 * 0.947 = 0.928, TREAD better
    rows = []
    for k, (p, t, s) in enumerate([(1e6, 64, 1800), (4e6, 64, 1800), (9e6, 64, 1800), (1e6, 256, 1800),
                                   (1e6, 64, 6000), (1e6, 64, 18000), (4e6, 256, 6000)]):
        noise = 1 + 0.001 * (-1) ** k
        rows.append({"params": p, "tokens": t, "step": s,
                     "ratio_equal_steps": noise * 1.2 * (p / 1e6) ** -0.05 * (t / 64) ** -0.02 * (s / 1800) ** -0.01})
    cells = pd.DataFrame(rows)
    text = trend_markdown(cells)
    assert "Extrapolated to the paper's DiT-S/2 point" in text and "TREAD better" in text
    assert "no prediction" in trend_markdown(cells[cells.tokens == 64].assign(tokens=64))
