"""Suite expansion: a composed suite config -> validated runs."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf

from backbones import list_backbones
from backbones.registry import ConfigError


def pick_device(requested: str) -> str:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def resolve_suite(cfg: DictConfig) -> DictConfig:
    """The composed suite (scale changes already merged by Hydra), resolved and detached."""
    return OmegaConf.create(OmegaConf.to_container(cfg.suite, resolve=True))


@dataclass
class RunSpec:
    suite: str
    scale: str
    backbone: str
    size: str
    method: str
    routes: list
    selection: str
    overrides: dict = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return f"{self.backbone}-{self.size.replace('/', '')}-{self.method}"

    def routes_str(self) -> str:
        """Resolved routes (negative ends counted from the top) once validate_run has run."""
        resolved = getattr(self, "resolved_routes", None)
        if resolved is not None:
            return " ".join(map(str, resolved)) or "none"
        return " ".join(f"r({r['start']}->{r['end']})@{r['rate']:g}" for r in self.routes) or "none"


def expand_runs(suite: DictConfig, scale: DictConfig) -> list[RunSpec]:
    runs = []
    for entry in suite.backbones:
        size = scale.size or entry.size
        for method, spec in suite.methods.items():
            if spec is None:  # a method removed by a scale override
                continue
            routes = [dict(r) for r in (spec.get("routes") or [])]
            runs.append(RunSpec(suite.name, scale.name, entry.name, size, method, routes,
                                spec.get("selection", entry.get("selection", suite.get("selection", "auto"))),
                                dict(entry.get("overrides") or {})))
    return runs


def validate_run(run: RunSpec, data_shape, num_classes: int):
    """Build the run's network on the meta device: checks backbone, size, shape and routes for free."""
    from diffusion.train import build_denoiser

    if run.backbone not in list_backbones():
        raise ConfigError(f"unknown backbone '{run.backbone}' in suite {run.suite}; "
                          f"registered: {', '.join(list_backbones())}")
    with torch.device("meta"):
        den = build_denoiser(run.backbone, run.size, data_shape, num_classes, run.routes, run.selection,
                             **run.overrides)
    run.resolved_routes = den.net.routes  # not a dataclass field: stays out of asdict() and the config hash
    return den


def config_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]
