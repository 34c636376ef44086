"""Suite kinds as plug-ins: ``@register_suite_kind("name", keys=...)`` on the function that runs a suite of that kind.

A kind is one file (tread_bench/kinds/ holds the built-in ones) plus the suites that name it (``kind: <name>``).
Its registration carries everything the engine needs to know about it: the suite keys only it reads (a
dataclass, typed and checked like the shared keys before anything runs), the rules for their values, a check of
the whole suite mapping for what types cannot say, and whether its runs train.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from omegaconf import DictConfig

from tread_bench.core.registry import Registry

#: run(cfg, suite) -> exit code; ``cfg`` is the composed configuration, ``suite`` its resolved suite section
KindRunner = Callable[[DictConfig, DictConfig], int]


@dataclass(frozen=True)
class SuiteKind:
    name: str
    run: KindRunner
    #: a dataclass of the top-level suite keys only this kind reads (None: it reads only the shared keys)
    keys: Optional[type] = None
    #: (key) -> (test, what the value must be), for ``keys``; a value of None passes (an optional key)
    rules: Dict[str, tuple] = field(default_factory=dict)
    #: check(suite mapping) -> None, raising ConfigError: what the key types cannot say (e.g. a key naming a method)
    check: Optional[Callable[[dict], None]] = None
    #: its runs train: plan=true applies, and the tracker's package must be installed
    trains: bool = False
    #: it puts each of its runs in a fresh process itself under scale=dryrun; otherwise the engine runs the whole
    #: suite in one fresh process
    isolates_dryrun_runs: bool = False

    @property
    def module(self) -> str:
        """Where the kind is defined (a fresh process imports it to find the kind again)."""
        return self.run.__module__


SUITE_KINDS: Registry[SuiteKind] = Registry("suite kind", "suite kinds")


def register_suite_kind(name: str, keys: Optional[type] = None, rules: Optional[Dict[str, tuple]] = None,
                        check: Optional[Callable[[dict], None]] = None, trains: bool = False,
                        isolates_dryrun_runs: bool = False) -> Callable[[KindRunner], KindRunner]:
    """Register ``run(cfg, suite) -> exit code`` as suite kind ``name`` (see :class:`SuiteKind`)."""

    def register(run: KindRunner) -> KindRunner:
        kind = SuiteKind(name, run, keys, dict(rules or {}), check, trains, isolates_dryrun_runs)
        SUITE_KINDS.add(name, kind, same=lambda a, b: (a.module, a.run.__qualname__) == (b.module, b.run.__qualname__))
        return run

    return register


def list_suite_kinds() -> list:
    return SUITE_KINDS.names()


def run_suite_kind(cfg: DictConfig, suite: DictConfig) -> int:
    """Run the suite's kind. Under scale=dryrun a kind that does not put each run in a fresh process itself runs
    whole in one (tread_bench/engine/dryrun.py; not under accelerate launch, whose processes run together)."""
    from accelerate import PartialState

    kind = SUITE_KINDS[suite.get("kind", "train")]
    if suite.get("dryrun") and not kind.isolates_dryrun_runs and PartialState().num_processes == 1:
        from .dryrun import run_isolated_suite

        return run_isolated_suite(cfg, suite)
    return kind.run(cfg, suite)
