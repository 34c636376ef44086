"""Suite expansion: a composed suite config -> validated runs."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from omegaconf import DictConfig, OmegaConf

from backbones import backbone_module, build_backbone, check_cuda_kernels, list_backbones
from tread_bench.core.errors import ConfigError
from tread_bench.methods import DEFAULT_KIND, method_arguments

from .schema import suggest


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
    """The composed suite (scale changes already merged by Hydra), resolved and detached. After
    ``validate_suite`` every value it holds has its schema's type (a value of another type is refused there), so
    it is read as it is, never re-parsed."""
    return OmegaConf.create(OmegaConf.to_container(cfg.suite, resolve=True))


@dataclass
class RunSpec:
    suite: str
    scale: str
    backbone: str
    size: str
    method: str                             # the suite's name for the method entry
    kind: str                               # the method's kind (tread_bench/methods/ registry)
    args: dict = field(default_factory=dict)  # the method's arguments: its entry's keys but kind, backbones, schedule
    overrides: dict = field(default_factory=dict)
    seed: int = 0
    objective: dict = field(default_factory=lambda: dict(DEFAULT_OBJECTIVE))  # {name, ...} (diffusion/)
    schedule: list = field(default_factory=list)  # the entry's stages [{step, <settings>}] (tread_bench/methods/schedule.py)
    # set by validate_run from the built network (not fields: they stay out of asdict() and the config hash)
    setting: ClassVar[str] = ""             # the method's own description (Method.describe)
    selection: ClassVar[str] = ""           # the token selection it uses (Method.selection)
    # set by prepare_runs from suite.eval (tread_bench/engine/eval_steps.py): steps it evaluates at besides
    # every eval.every steps and its last
    eval_at: ClassVar[tuple] = ()

    @property
    def run_id(self) -> str:
        """The configuration (backbone, size, method; the objective unless EDM); seeds of one configuration
        share it. Runs of different objectives never share a folder or a table row."""
        name = self.objective.get("name", "edm")
        return f"{self.backbone}-{self.size.replace('/', '')}-{self.method}" + ("" if name == "edm" else f"-{name}")

    @property
    def dir_name(self) -> str:
        return f"{self.run_id}-seed{self.seed}"


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

    A method entry names its ``kind`` (tread_bench/methods/ registry; methods.DEFAULT_KIND when it names none) and
    its arguments; a method that takes ``selection`` and whose entry sets none gets the backbone entry's or the
    suite's. It may name the backbones it applies to (``backbones: [dit]``), e.g. a sweep
    run on one backbone only. Entries that collapse to the same backbone and size under a scale (every size ->
    "tiny") run once. Every run gets the suite's objective (``objective=<name>`` on the command line).
    """
    objective = _plain(suite.get("objective") or DEFAULT_OBJECTIVE)
    runs, seen = [], set()
    for entry in suite.backbones:
        size = scale.size or entry.size
        sizes = list_backbones().get(entry.name)
        if entry.get("size") is not None and sizes is not None and entry.size not in sizes:  # even if a scale replaces it
            raise ConfigError(f"unknown size '{entry.size}' for backbone '{entry.name}' in suite {suite.name}; "
                              f"{suggest(str(entry.size), sizes)}its sizes: {', '.join(sizes)}")
        if scale.size and sizes is not None and scale.size not in sizes:
            raise ConfigError(f"backbone '{entry.name}' has no size '{scale.size}', which scale={scale.name} gives every "
                              f"backbone; add '{scale.size}' to its size table (@register_backbone(..., sizes=...)) or "
                              f"pick another scale; its sizes: {', '.join(sizes)}")
        for seed in suite_seeds(suite):
            for method, spec in suite.methods.items():
                if spec is None:  # a method removed by a scale override
                    continue
                only = spec.get("backbones")
                if only is not None and entry.name not in only:
                    continue
                kind = spec.get("kind", DEFAULT_KIND)
                args = {k: v for k, v in _plain(spec).items() if k not in ("kind", "backbones", "schedule")}
                if "selection" not in args and "selection" in (method_arguments(kind) or ()):
                    fallback = entry.get("selection", suite.get("selection"))  # the backbone's, else the suite's
                    if fallback is not None:
                        args["selection"] = fallback
                run = RunSpec(suite.name, scale.name, entry.name, size, method, kind, args,
                              dict(entry.get("overrides") or {}), seed, objective,
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
                         fp32_after_route=fp32_after_route, overrides=run.overrides, **run.args)


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
    from .eval_steps import assign_eval_steps

    runs = expand_runs(suite, cfg.scale)
    every_run = list(runs)
    if only and cfg.get("only"):
        kept = [r for r in runs if cfg.only in r.dir_name]
        if not kept:
            raise ConfigError(f"only='{cfg.only}' matches no run of suite {suite.name}; its runs: "
                              f"{', '.join(r.dir_name for r in runs)}")
        runs = kept
    tried = set()
    # Kernels the run's device lacks are found here, before the first run trains; flops and plan=true only
    # count on the meta device.
    on_cuda = pick_device(cfg.get("device", "auto")) == "cuda" and not cfg.get("plan") and suite.get("kind") != "flops"
    for run in runs:
        model = validate_run(run, data_shape, num_classes)
        if on_cuda:
            check_cuda_kernels(model, bool(suite.get("allow_slow_scan", False)), f"run {run.dir_name}")
        if run.run_id not in tried:  # once per configuration, not per seed
            tried.add(run.run_id)
            try_plugins(run, data_shape, num_classes)
    if suite.get("train") is not None:
        assign_eval_steps(runs, suite, data_shape, num_classes, siblings=every_run)
    return runs


#: the packages of this project: a backbone or method registered from anywhere else is a plug-in
BUILT_IN = ("backbones", "routing", "diffusion", "tread_bench")


def try_plugins(run: RunSpec, data_shape, num_classes: int) -> None:
    """A run whose backbone or method is a plug-in (registered outside this project) is built on the CPU and run
    once as training runs it, on 2 images whose labels include the unconditional one (label dropout's
    ``num_classes``), then its FLOPs are counted (the fvcore trace the tables use): a plug-in mistake becomes one
    line naming the plug-in, the call and the fix, before any run trains. Built-in ones are covered by the tests."""
    from tread_bench.measure.flops import flops_row
    from tread_bench.methods import method_module

    plugins = [f"backbone '{run.backbone}' ({backbone_module(run.backbone)})"] if not _built_in(
        backbone_module(run.backbone)) else []
    module = method_module(run.kind)
    if module is not None and not _built_in(module):
        plugins.append(f"method '{run.kind}' ({module})")
    if not plugins:
        return
    channels, height, width = data_shape
    call = "building it on the CPU"
    try:
        torch.manual_seed(0)
        net = build_run_network(run, data_shape, num_classes).train()
        call = f"its training forward on 2 CPU images with labels 0 and {num_classes} (the unconditional label)"
        with torch.no_grad():
            net(torch.randn(2, channels, height, width), torch.zeros(2), torch.tensor([0, num_classes]))
        call = "counting its FLOPs (tread_bench.measure.flops traces forward with fvcore)"
        flops_row(net, height, channels, num_classes)
    except ConfigError:
        raise
    except Exception as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        hint = ""
        if isinstance(err, IndexError) and "index out of range" in str(err):
            hint = ("; a class embedding needs num_classes + 1 rows: label dropout feeds the unconditional label, "
                    f"index {num_classes}")
        elif "__round__" in str(err) or "__index__" in str(err) or "TracerWarning" in str(err):
            hint = ("; under the FLOP counter's trace a size read off a tensor (tokens.shape[1]) is a traced value: "
                    "make each token count a plain int with int(...)")
        raise ConfigError(f"{' and '.join(plugins)} in run {run.dir_name}: {call} failed ({reason}){hint}") from None


def _built_in(module: str) -> bool:
    return module.split(".")[0] in BUILT_IN


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def validate_run(run: RunSpec, data_shape, num_classes: int):
    """Build the run's model on the meta device: checks backbone, size, shape, method and objective for free, and
    the schedule's stages (applied in order to a second meta network). Sets the run's ``setting`` and
    ``selection`` from the network. Returns ``objective.wrap(network)`` (its ``.net`` is the method network, at the
    entry's own settings)."""
    from tread_bench.methods import describe_schedule, parse_schedule
    from diffusion import build_objective

    if run.backbone not in list_backbones():
        raise ConfigError(f"unknown backbone '{run.backbone}' in suite {run.suite}; "
                          f"registered: {', '.join(list_backbones())}")
    objective = build_objective(**run.objective)
    channels, height, _ = data_shape
    with torch.device("meta"):  # the backbone alone first: its errors are not the method entry's
        build_backbone(run.backbone, run.size, input_size=height, in_channels=channels, num_classes=num_classes,
                       **run.overrides)
        try:
            model = objective.wrap(build_run_network(run, data_shape, num_classes))
        except ConfigError as err:
            raise ConfigError(f"suite.methods.{run.method}: {err}") from None
    run.setting, run.selection = model.net.describe(), model.net.selection
    if "selection" in run.args:
        run.args["selection"] = run.selection  # resolved ("auto" -> what trains), so the config hash sees it
    if run.schedule:
        path = f"suite.methods.{run.method}.schedule"
        stages = parse_schedule(run.schedule, path, run.kind)
        with torch.device("meta"):
            staged = build_run_network(run, data_shape, num_classes)
        run.setting = describe_schedule(staged, stages, path)  # every stage's values checked by the method
    return model


DEFAULT_OBJECTIVE = {"name": "edm"}

# Train keys that cannot change a run's results (how data is read): kept out of the hash.
_HASH_IGNORED_TRAIN = ("loader_workers",)
# Suite keys that cannot change a run's results (where finished runs may be copied from: tread_bench/engine/reuse.py).
# seeds and jobs: which runs a sitting trains and how many at a time; each run's own seed is in its RunSpec.
_HASH_IGNORED_SUITE = ("reuse_from", "allow_slow_scan", "seeds", "jobs")  # allow_slow_scan: the same maths, slower


def config_hash(obj) -> str:
    if isinstance(obj, dict) and ("run" in obj or "suite" in obj):
        obj = dict(obj)
        suite = obj.get("suite")
        if isinstance(suite, dict):
            obj["suite"] = suite = {k: v for k, v in suite.items() if k not in _HASH_IGNORED_SUITE}
        if isinstance(suite, dict) and isinstance(suite.get("train"), dict):
            train = {k: v for k, v in suite["train"].items() if k not in _HASH_IGNORED_TRAIN}
            obj["suite"] = {**suite, "train": train}
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]
