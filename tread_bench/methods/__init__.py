"""Token-reduction methods as plug-ins. Importing this package registers the built-in kinds (``tread``,
``drop``, ``maskdit``, ``sprint``).

A folder of its own, beside backbones/: a method is neither a backbone nor diffusion code, and the
trainer, FLOP counter, throughput step, sampler and guidance code reach a method only through
:class:`Method` (tread_bench/methods/registry.py), so adding one is one file here plus its suite YAML.
"""
from .registry import (DEFAULT_KIND, LossTerms, Method, SeededMethod, build_method, build_network, list_methods, method_arguments,
                       method_kind, method_module, register_method, schedulable_settings)
from .schedule import Stage, apply_stages, cumulative_cost, describe_schedule, parse_schedule, stage_index, stage_starts

from . import tread  # noqa: F401  (registers "tread")
from . import drop, maskdit  # noqa: F401  (register "drop" and "maskdit")
from . import sprint  # noqa: F401  (registers "sprint")

__all__ = ["DEFAULT_KIND", "LossTerms", "Method", "SeededMethod", "Stage", "apply_stages", "build_method", "build_network",
           "describe_schedule", "cumulative_cost", "list_methods", "method_arguments", "method_kind", "method_module", "parse_schedule", "register_method", "schedulable_settings",
           "stage_index", "stage_starts"]
