"""Suite expansion: a composed suite config -> validated runs."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf

from backbones import list_backbones
from tread_bench.core.errors import ConfigError
from routing.routes import route_dict


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
    kind: str = "tread"                     # the method's kind (tread_bench/methods/ registry)
    args: dict = field(default_factory=dict)  # the method's other arguments (all keys of its entry but kind,
                                              # backbones, and for TREAD routes/selection, which have fields)
    objective: dict = field(default_factory=lambda: dict(DEFAULT_OBJECTIVE))  # {name, ...} (diffusion/)
    schedule: list = field(default_factory=list)  # the entry's stages [{step, <settings>}] (tread_bench/methods/schedule.py)

    @property
    def run_id(self) -> str:
        """The configuration (backbone, size, method; the objective unless EDM); seeds of one configuration
        share it. Runs of different objectives never share a folder or a table row."""
        name = self.objective.get("name", "edm")
        return f"{self.backbone}-{self.size.replace('/', '')}-{self.method}" + ("" if name == "edm" else f"-{name}")

    def method_args(self) -> dict:
        """Keyword arguments of the run's method (methods.build_network)."""
        if self.kind == "tread":
            return {"routes": self.routes, "selection": self.selection, **self.args}
        return dict(self.args)

    @property
    def dir_name(self) -> str:
        return f"{self.run_id}-seed{self.seed}"

    def routes_str(self) -> str:
        """The method's description (resolved routes, negative ends counted from the top) once validate_run
        has run."""
        description = getattr(self, "description", None)
        if description is not None:
            return description
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

    A method entry names its ``kind`` (tread_bench/methods/ registry; default tread) and its arguments; TREAD's are
    ``routes`` and ``selection``. It may name the backbones it applies to (``backbones: [dit]``), e.g. a sweep
    run on one backbone only. Entries that collapse to the same backbone and size under a scale (every size ->
    "tiny") run once. Every run gets the suite's objective (``objective=<name>`` on the command line).
    """
    objective = _plain(suite.get("objective") or DEFAULT_OBJECTIVE)
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
                kind = spec.get("kind", "tread")
                # a route in the paper's notation ("2->8@0.5") becomes a mapping; mappings stay as written
                routes = [route_dict(r) if isinstance(r, str) else dict(r) for r in (spec.get("routes") or [])]
                selection = spec.get("selection", entry.get("selection", suite.get("selection", "auto")))
                args = {k: v for k, v in _plain(spec).items()
                        if k not in ("kind", "backbones", "routes", "selection", "schedule")}
                if kind != "tread":  # other kinds get exactly their entry's arguments
                    args.update({k: spec[k] for k in ("routes", "selection") if k in spec})
                    routes, selection = [], "none"
                run = RunSpec(suite.name, scale.name, entry.name, size, method, routes, selection,
                              dict(entry.get("overrides") or {}), seed, kind, args, objective,
                              list(_plain(spec).get("schedule") or []))
                if (run.run_id, seed) not in seen:
                    seen.add((run.run_id, seed))
                    runs.append(run)
    return runs


def build_run_network(run: RunSpec, data_shape, num_classes: int, seed: int = 0, fp32_after_route: bool = True):
    """The run's method network, by methods.build_network (the one build function; validation, training, FLOP
    counting and throughput all come through here). The run's objective wraps it for training."""
    from tread_bench.methods import build_network

    return build_network(run.backbone, run.size, data_shape, num_classes, run.kind, seed=seed,
                         fp32_after_route=fp32_after_route, overrides=run.overrides, **run.method_args())


def build_run_model(run: RunSpec, data_shape, num_classes: int, seed: int = 0, fp32_after_route: bool = True):
    """``(objective, objective.wrap(method network))``: what the run trains (``functools.partial`` of this is the
    picklable builder tread_bench.measure.memory runs in a process of its own)."""
    from diffusion import build_objective

    objective = build_objective(**run.objective)
    return objective, objective.wrap(build_run_network(run, data_shape, num_classes, seed, fp32_after_route))


def run_stages(run: RunSpec):
    """The run's schedule as methods.Stage objects (checked; [] without a schedule)."""
    from tread_bench.methods import parse_schedule

    return parse_schedule(run.schedule, f"suite.methods.{run.method}.schedule", run.kind)


def load_suite_data(suite: DictConfig):
    """The suite's training images (tread_bench.data.load_dataset with the suite's data section)."""
    from tread_bench.data import load_dataset

    return load_dataset(suite.data.name, suite.data.resolution, limit=suite.data.get("limit"),
                        **(suite.data.get("kwargs") or {}))


def prepare_runs(cfg: DictConfig, suite: DictConfig, data_shape, num_classes: int, only: bool = False) -> list:
    """The suite's runs, every one validated on the meta device before any of them runs ("auto" selection
    resolved). With ``only`` the command line's ``only=<text>`` keeps the runs whose folder name holds it; a text
    that matches no run is refused."""
    runs = expand_runs(suite, cfg.scale)
    if only and cfg.get("only"):
        kept = [r for r in runs if cfg.only in r.dir_name]
        if not kept:
            raise ConfigError(f"only='{cfg.only}' matches no run of suite {suite.name}; its runs: "
                              f"{', '.join(r.dir_name for r in runs)}")
        runs = kept
    for run in runs:
        run.selection = validate_run(run, data_shape, num_classes).net.selection
    return runs


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def validate_run(run: RunSpec, data_shape, num_classes: int):
    """Build the run's model on the meta device: checks backbone, size, shape, method and objective for free, and
    the schedule's stages (applied in order to a second meta network). Returns ``objective.wrap(network)`` (its
    ``.net`` is the method network, at the entry's own settings)."""
    from tread_bench.methods import describe_schedule, parse_schedule
    from diffusion import build_objective

    if run.backbone not in list_backbones():
        raise ConfigError(f"unknown backbone '{run.backbone}' in suite {run.suite}; "
                          f"registered: {', '.join(list_backbones())}")
    objective = build_objective(**run.objective)
    with torch.device("meta"):
        model = objective.wrap(build_run_network(run, data_shape, num_classes))
    run.description = model.net.describe()  # not a dataclass field: stays out of asdict() and the config hash
    if run.schedule:
        path = f"suite.methods.{run.method}.schedule"
        stages = parse_schedule(run.schedule, path, run.kind)
        with torch.device("meta"):
            staged = build_run_network(run, data_shape, num_classes)
        run.description = describe_schedule(staged, stages, path)  # every stage's values checked by the method
    return model


DEFAULT_OBJECTIVE = {"name": "edm"}
# Run keys added after runs were first hashed, at their default values: left out of the hash, so runs
# configured before methods and objectives were plug-ins keep their hash (and resume their checkpoints).
_HASH_DEFAULTS = {"kind": "tread", "args": {}, "objective": DEFAULT_OBJECTIVE, "schedule": []}


# Train keys that cannot change a run's results (how data is read): kept out of the hash.
_HASH_IGNORED_TRAIN = ("loader_workers",)
# Suite keys that cannot change a run's results (where finished runs may be copied from: tread_bench/engine/reuse.py).
_HASH_IGNORED_SUITE = ("reuse_from",)


def config_hash(obj) -> str:
    if isinstance(obj, dict) and ("run" in obj or "suite" in obj):
        obj = dict(obj)
        suite = obj.get("suite")
        if isinstance(suite, dict):
            obj["suite"] = suite = {k: v for k, v in suite.items() if k not in _HASH_IGNORED_SUITE}
        if isinstance(suite, dict) and isinstance(suite.get("train"), dict):
            train = {k: v for k, v in suite["train"].items() if k not in _HASH_IGNORED_TRAIN}
            obj["suite"] = {**suite, "train": train}
        if isinstance(obj.get("run"), dict):
            obj["run"] = {k: v for k, v in obj["run"].items() if _HASH_DEFAULTS.get(k, object()) != v}
        if isinstance(obj.get("suite"), dict) and obj["suite"].get("objective") == DEFAULT_OBJECTIVE:
            obj["suite"] = {k: v for k, v in obj["suite"].items() if k != "objective"}
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]
