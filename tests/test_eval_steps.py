"""Where runs evaluate (tread_bench/engine/eval_steps.py): suite.eval.at, and the flop-matched method's extra
evaluations at the other methods' training FLOPs, against worked examples."""
import pytest

from tread_bench.engine.eval_steps import flop_matched_step, scheduled_steps
from tread_bench.measure.flops import flops_table_row
from suite_helpers import compose_suite


def test_scheduled_steps_are_every_n_the_listed_ones_and_the_last():
    assert scheduled_steps(1800, 300) == [300, 600, 900, 1200, 1500, 1800]
    assert scheduled_steps(18000, 0, [900, 1800, 3600, 7200, 14400, 20000]) == [900, 1800, 3600, 7200, 14400, 18000]
    assert scheduled_steps(10, 4, [5]) == [4, 5, 8, 10]


def test_the_flop_matched_step_is_the_nearest_one_within_half_a_step():
    # a baseline spending 10 FLOPs a step: TREAD's 1,450 FLOPs land on step 145 exactly, 1,454 on 145 (nearer than
    # 146 at 1,460), 1,456 on 146; 10,006 FLOPs are within half a step of step 1,000 (10,000), 10,006 + 10 are not
    cumulative = [10.0 * s for s in range(1001)]
    assert flop_matched_step(1450, cumulative) == 145
    assert flop_matched_step(1454, cumulative) == 145
    assert flop_matched_step(1456, cumulative) == 146
    assert flop_matched_step(10_004, cumulative) == 1000
    assert flop_matched_step(10_016, cumulative) is None
    assert flop_matched_step(3, cumulative) == 1  # never step 0 (no training yet)


def test_the_baseline_of_a_tiny_crossover_cell_evaluates_at_treads_flops():
    from tread_bench.data import load_dataset
    from tread_bench.engine.spec import prepare_runs, resolve_suite

    cfg = compose_suite(["suite=crossover", "scale=tiny"])
    suite = resolve_suite(cfg)
    data = load_dataset(suite.data.name, suite.data.resolution, limit=64)
    runs = prepare_runs(cfg, suite, data.shape, data.num_classes)
    base = next(r for r in runs if r.method == "baseline" and r.size == "XS/4" and r.seed == 0)
    tread = next(r for r in runs if r.method == "tread" and r.size == "XS/4" and r.seed == 0)
    assert tread.eval_at == ()  # every 10 steps and the last: nothing extra
    # by hand: TREAD's training MACs per image over the baseline's (the FLOP table's counter), times 10 and 20
    ratio = (flops_table_row("dit", "XS/4", None, 32, 1, 10, **tread.args)["gflops_train"]
             / flops_table_row("dit", "XS/4", None, 32, 1, 10, **base.args)["gflops_train"])
    assert 0.5 < ratio < 1
    assert base.eval_at == tuple(sorted({round(10 * ratio), round(20 * ratio)} - {20}))


def test_a_flop_match_that_names_no_method_is_one_line():
    from tread_bench.core.errors import ConfigError
    from tread_bench.engine import validate_suite

    with pytest.raises(ConfigError, match="suite.eval.flop_match = 'baseline2' is not a method of suite crossover; "
                                          "did you mean 'baseline'"):
        validate_suite(compose_suite(["suite=crossover", "scale=tiny", "suite.eval.flop_match=baseline2"]))
