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


def choose_scale(cfg: DictConfig) -> tuple[str, str]:
    """(scale, one line saying why) for ``scale=auto``: an ImageNet suite runs at full scale when latents
    are configured and at the CPU scale otherwise; every other suite runs as written."""
    data = cfg.suite.get("data") or {}
    if data.get("name") != "latents":
        return "full", ""
    path = (data.get("kwargs") or {}).get("path")
    if path:
        return "full", f"scale: full (ImageNet-256 latents at {path})"
    return "cpu", ("scale: cpu (no ImageNet latents configured: Fashion-MNIST on CPU; for the full ImageNet-256 "
                   "scale set IMAGENET_LATENTS=<latent folder> or suite.data.kwargs.path=<folder>, or pass scale=full)")


def apply_auto_scale(cfg: DictConfig, task_overrides, compose) -> DictConfig:
    """``cfg`` recomposed at the scale choose_scale picks when it was composed with scale=auto.

    ``compose`` is hydra.compose (inside run_suite's @hydra.main, or a test's initialize_config_dir);
    ``task_overrides`` are the command line's overrides, kept, with the scale replaced."""
    if cfg.scale.name != "auto":
        return cfg
    target, line = choose_scale(cfg)
    if line:
        print(line)
    kept = [o for o in task_overrides if not o.lstrip("+~").startswith("scale=")]
    return compose(config_name="config", overrides=kept + [f"scale={target}"])


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
    seed: int = 0

    @property
    def run_id(self) -> str:
        """The configuration (backbone, size, method); seeds of one configuration share it."""
        return f"{self.backbone}-{self.size.replace('/', '')}-{self.method}"

    @property
    def dir_name(self) -> str:
        return f"{self.run_id}-seed{self.seed}"

    def routes_str(self) -> str:
        """Resolved routes (negative ends counted from the top) once validate_run has run."""
        resolved = getattr(self, "resolved_routes", None)
        if resolved is not None:
            return " ".join(map(str, resolved)) or "none"
        return " ".join(f"r({r['start']}->{r['end']})@{r['rate']:g}" for r in self.routes) or "none"


def suite_seeds(suite: DictConfig) -> list[int]:
    """``seeds: [0, 1, 2]`` trains every configuration once per seed; ``seed: s`` is the one-seed form."""
    seeds = suite.get("seeds")
    if seeds is None:
        return [int(suite.get("seed", 0))]
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"suite {suite.name}: seeds must be a non-empty list of distinct integers, got {seeds}")
    return seeds


def expand_runs(suite: DictConfig, scale: DictConfig) -> list[RunSpec]:
    """Backbone x seed x method, in that order (the runs of one backbone and seed finish close together).

    A method may name the backbones it applies to (``backbones: [dit]``), e.g. a sweep run on one backbone
    only. Entries that collapse to the same backbone and size under a scale (every size -> "tiny") run once.
    """
    runs, seen = [], set()
    for entry in suite.backbones:
        size = scale.size or entry.size
        for seed in suite_seeds(suite):
            for method, spec in suite.methods.items():
                if spec is None:  # a method removed by a scale override
                    continue
                only = spec.get("backbones")
                if only is not None and entry.name not in only:
                    continue
                routes = [dict(r) for r in (spec.get("routes") or [])]
                run = RunSpec(suite.name, scale.name, entry.name, size, method, routes,
                              spec.get("selection", entry.get("selection", suite.get("selection", "auto"))),
                              dict(entry.get("overrides") or {}), seed)
                if (run.run_id, seed) not in seen:
                    seen.add((run.run_id, seed))
                    runs.append(run)
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
