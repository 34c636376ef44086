"""Schedules: a run that changes its method's settings at given training steps.

A method entry's ``schedule`` is a list of stages ``{step: s, <setting>: <value>, ...}``: the first ``s`` steps use
the settings before the stage, every later step the stage's. Stages are cumulative, their steps strictly increase
in [1, steps - 1], and only a kind's ``Method.schedulable`` settings (which change no parameter) may change.
Training FLOPs are summed over stages (:func:`cumulative_cost`).
Details: docs/internals.md#tread_benchmethodsschedulepy
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral
from typing import List, Mapping, Optional, Sequence

from tread_bench.core.errors import ConfigError

from .registry import Method, schedulable_settings

EXAMPLE = "[{step: 1600, mask_ratio: 0.0}]"


@dataclass(frozen=True)
class Stage:
    """From training step ``step`` on (after ``step`` steps), the method runs with ``settings``."""

    step: int
    settings: dict = field(default_factory=dict)


def parse_schedule(schedule, path: str = "schedule", kind: Optional[str] = None,
                   steps: Optional[int] = None) -> List[Stage]:
    """``schedule`` (a list of ``{step, <settings>}``; None or [] for none) as Stages, checked: each stage a mapping
    with a whole ``step`` >= 1, below ``steps`` when given (the run's training steps), steps strictly increasing,
    at least one setting, and (when ``kind`` is a registered Method class) only settings the kind may change.
    Anything else is a ConfigError of one line naming ``path``. Setting values are checked by the method itself
    (``apply_settings``) when the run's network is built for validation."""
    if schedule is None:
        return []
    if isinstance(schedule, (str, bytes, Mapping)) or not isinstance(schedule, Sequence):
        raise ConfigError(f"{path} must be a list of stages such as {EXAMPLE}, got {schedule!r}")
    allowed = schedulable_settings(kind) if kind is not None else None
    stages, previous = [], None
    for i, entry in enumerate(schedule):
        where = f"{path}[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping such as {{step: 1600, mask_ratio: 0.0}}, got {entry!r}")
        step = entry.get("step")
        if isinstance(step, bool) or not isinstance(step, Integral):
            raise ConfigError(f"{where}.step = {step!r} must be a whole number of training steps (the stage begins "
                              "after that many steps); e.g. step: 1600")
        if step < 1:
            raise ConfigError(f"{where}.step = {step} must be >= 1 (step 0 is the entry's own settings: set them "
                              "there)")
        if steps is not None and step >= steps:
            raise ConfigError(f"{where}.step = {step} is not below the run's {steps} training steps, so the stage "
                              f"would never train; use a step in [1, {steps - 1}] or train longer")
        if previous is not None and step <= previous:
            raise ConfigError(f"{where}.step = {step} must be greater than the previous stage's step {previous}; "
                              "list the stages in increasing step order")
        settings = {str(k): v for k, v in entry.items() if k != "step"}
        if not settings:
            raise ConfigError(f"{where} changes nothing; name the settings this stage sets, e.g. "
                              f"{{step: {step}, mask_ratio: 0.0}}")
        if allowed is not None:
            unknown = [k for k in settings if k not in allowed]
            if unknown:
                can = f"its schedule may change: {', '.join(allowed)}" if allowed else "it has no schedulable settings"
                raise ConfigError(f"{where}: a method of kind {kind} cannot change {', '.join(unknown)} during a run; "
                                  f"{can}")
        stages.append(Stage(int(step), settings))
        previous = step
    return stages


def stage_index(stages: Sequence[Stage], step: int) -> int:
    """How many stages have begun once ``step`` training steps are done (0: the entry's own settings)."""
    return sum(1 for stage in stages if stage.step <= step)


def apply_stages(net: Method, stages: Sequence[Stage], begun: int, reached: int) -> int:
    """Apply stages ``begun .. reached - 1`` to ``net`` in order; returns ``reached`` (the stages now begun)."""
    for stage in stages[begun:reached]:
        net.apply_settings(**stage.settings)
    return max(begun, reached)


def describe_schedule(net: Method, stages: Sequence[Stage], path: str = "schedule") -> str:
    """The ``routes`` column of a scheduled run: ``net.describe()``, then per stage ``; from step s: <what
    changed>`` (the parts of the stage's description that differ, e.g. ``maskdit@0.5, decoder 8x512, mae 0.1; from
    step 384000: maskdit@0``). Applies every stage to ``net`` (a throwaway network, e.g. on the meta device), so
    a value the method refuses is a ConfigError naming the stage."""
    text = net.describe()
    for i, stage in enumerate(stages):
        before = net.describe().split(", ")
        try:
            net.apply_settings(**stage.settings)
        except ConfigError as err:
            raise ConfigError(f"{path}[{i}] (step {stage.step}): {err}") from None
        after = net.describe()
        changed = [part for part in after.split(", ") if part not in before]
        text += f"; from step {stage.step}: {', '.join(changed) or after}"
    return text


def stage_starts(stages: Sequence[Stage]) -> List[int]:
    """The first step (steps done before it) of each stage, the entry's own settings first: [0, s1, s2, ...]."""
    return [0] + [stage.step for stage in stages]


def cumulative_cost(step: int, starts: Sequence[int], costs: Sequence[float], units_per_step: int = 1) -> float:
    """Sum over stages of (training steps among the first ``step`` that fall in the stage) x ``units_per_step`` x
    the stage's cost per unit; ``starts`` from :func:`stage_starts`, ``costs`` one per stage (e.g. training MACs
    per image, with ``units_per_step`` the global batch: then one stage gives exactly cost x images seen)."""
    total = 0.0
    for i, (start, cost) in enumerate(zip(starts, costs)):
        end = starts[i + 1] if i + 1 < len(starts) else math.inf
        done = max(0, min(step, end) - start)
        if done:
            total += (done * units_per_step) * cost
    return total


__all__ = ["Stage", "apply_stages", "cumulative_cost", "describe_schedule", "parse_schedule", "stage_index",
           "stage_starts"]
