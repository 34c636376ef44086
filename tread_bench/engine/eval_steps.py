"""Where a run evaluates besides every ``suite.eval.every`` steps and its final step: the steps ``suite.eval.at``
lists, and, for the runs of the method ``suite.eval.flop_match`` names, the steps where their training FLOPs equal
another method's (same backbone, size and seed) at that method's evaluation steps. A comparison at equal FLOPs
then reads two evaluations instead of interpolating a curve between evaluations (over a convex stretch of a
loss curve a straight line overstates the loss)."""
from __future__ import annotations

import bisect
from typing import Iterable, Sequence

from omegaconf import DictConfig


def scheduled_steps(total: int, every: int, at: Iterable[int] | None = None) -> list[int]:
    """The steps a run of ``total`` steps evaluates at: every ``every`` steps (0: none), ``at``, and the last."""
    steps = set(range(every, total + 1, every)) if every else set()
    steps |= {int(s) for s in (at or ()) if 0 < int(s) <= total}
    steps.add(total)
    return sorted(steps)


def flop_matched_step(flops: float, cumulative: Sequence[float]) -> int | None:
    """The step whose cumulative training FLOPs (``cumulative[s]`` after ``s`` steps, ``cumulative[0] == 0``) are
    closest to ``flops``; None when ``flops`` lies beyond the last step by more than half a step."""
    last = len(cumulative) - 1
    if last < 1 or flops > cumulative[last] + (cumulative[last] - cumulative[last - 1]) / 2:
        return None
    after = min(bisect.bisect_left(cumulative, flops), last)
    before = max(after - 1, 1)
    return min((before, after), key=lambda s: (abs(cumulative[s] - flops), s))


def assign_eval_steps(runs: list, suite: DictConfig, data_shape, num_classes: int, siblings: list | None = None) -> None:
    """Set ``run.eval_at`` (the steps beyond every ``eval.every`` and the last) on each of ``runs``. ``siblings``:
    every run of the suite (default ``runs``), whose evaluation steps the flop-matched method matches, so a run
    trained on its own (``only=``) evaluates where its siblings do."""
    evaluation = suite.get("eval") or {}
    at, reference = list(evaluation.get("at") or []), evaluation.get("flop_match")
    total, every = suite.train.steps, evaluation.get("every") or 0
    for run in runs:
        run.eval_at = tuple(s for s in scheduled_steps(total, 0, at) if s != total)
    if reference is None:
        return
    siblings = runs if siblings is None else siblings
    own = scheduled_steps(total, every, at)
    batch = suite.train.global_batch
    curves: dict = {}

    def cumulative(run) -> list[float]:
        if run.run_id not in curves:
            curves[run.run_id] = _cumulative_flops(run, total, batch, data_shape, num_classes)
        return curves[run.run_id]

    for run in runs:
        if run.method != reference:
            continue
        matched = set(run.eval_at)
        for other in siblings:
            if (other.method == reference or other.backbone != run.backbone or other.size != run.size
                    or other.seed != run.seed or other.overrides != run.overrides or other.objective != run.objective):
                continue
            theirs, mine = cumulative(other), cumulative(run)
            for step in own:
                found = flop_matched_step(theirs[step], mine)
                if found is not None and found != total:
                    matched.add(found)
        run.eval_at = tuple(sorted(matched))


def _cumulative_flops(run, total: int, batch: int, data_shape, num_classes: int) -> list[float]:
    """Training FLOPs after 0, 1, ..., ``total`` steps (the schedule's stages included), as the runs table counts
    them (tread_bench.engine.lifecycle.train_one)."""
    import torch

    from tread_bench.measure.flops import train_macs_per_stage
    from tread_bench.methods import cumulative_cost, stage_starts

    from .spec import build_run_network, run_stages

    stages = run_stages(run)
    with torch.device("meta"):
        net = build_run_network(run, data_shape, num_classes)
    macs, starts = train_macs_per_stage(net, stages, data_shape, num_classes), stage_starts(stages)
    return [cumulative_cost(step, starts, macs, units_per_step=batch) for step in range(total + 1)]
