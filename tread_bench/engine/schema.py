"""The typed configuration of a suite, checked before anything runs (``validate_suite``).

run_suite.py composes the suite with Hydra, resolves ``scale=auto``, then calls :func:`validate_suite`
before any suite kind runs: unknown keys, values of the wrong type and impossible values are refused with
one :class:`~tread_bench.core.errors.ConfigError` naming the key and the fix (run_suite prints it as one ``error:``
line and exits 2), before any run or results folder is written.

The schema is dataclasses: the training section is :class:`tread_bench.training.trainer.TrainConfig` and the evaluation
section :class:`tread_bench.measure.evaluate.EvalConfig` themselves (the fields the code reads are the fields a suite
may set), the rest is below. OmegaConf merges a section into its dataclass (``OmegaConf.structured``),
which refuses unknown keys and unconvertible values; :data:`RULES` then refuses impossible values.
Checks that need a built network (a route beyond the depth, an input size the patch size does not
divide, an unknown backbone) stay where the network is built, ``tread_bench.engine.spec.validate_run``, which also
runs before any training.

Escape hatches for plug-ins: a method entry's keys other than ``kind``, ``backbones`` and ``schedule`` are that
method's own arguments (checked against its factory's signature when it is registered); ``suite.objective`` is
passed to the objective as written; a suite kind that is not built in keeps its own extra keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tempfile
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from tread_bench.core.errors import ConfigError
from tread_bench.methods import method_arguments
from tread_bench.training.precision import PRECISIONS

from .kinds import SUITE_KINDS


@dataclass
class DataSchema:
    name: Optional[str] = None          # a dataset of data.DATASETS (flops/throughput suites give only the shape)
    resolution: int = 32                # input height = width, in pixels (or latent cells)
    channels: Optional[int] = None      # flops/throughput suites: the input's channels and classes
    num_classes: Optional[int] = None
    limit: Optional[int] = None         # the first `limit` training images (null: all)
    kwargs: Optional[Dict[str, Any]] = None   # passed to the dataset loader (latents: path)


@dataclass
class BackboneSchema:
    name: str = "dit"
    size: Optional[str] = None
    selection: Optional[str] = None
    overrides: Optional[Dict[str, Any]] = None   # constructor keywords of the backbone


@dataclass
class SuiteSchema:
    """The keys every suite may have; a kind's own keys are registered with it (tread_bench/engine/kinds.py)."""
    name: str = "suite"
    kind: str = "train"
    results_file: Optional[str] = None
    data: DataSchema = field(default_factory=DataSchema)
    seed: int = 0
    seeds: Optional[List[int]] = None
    jobs: int = 1
    dryrun: bool = False     # scale=dryrun sets it: each run in a fresh process, peak memory to results/dryrun.csv
    selection: str = "auto"
    allow_slow_scan: bool = False  # Mamba on CUDA without mamba-ssm/causal-conv1d: warn and run the slow pure scan
    backbones: List[Any] = field(default_factory=list)        # entries checked against BackboneSchema
    methods: Dict[str, Any] = field(default_factory=dict)   # entries checked by check_method
    objective: Any = None                                    # read by the objective plug-in
    # train: tread_bench.training.trainer.TrainConfig, eval: tread_bench.measure.evaluate.EvalConfig (checked by check_section)


#: the suites with a dry-run configuration (suites/suite_scale/<suite>_dryrun.yaml)
DRYRUN_SUITES = ("dit_scaling", "arch_agnostic", "selection_rate", "route_ablation", "guidance")
#: TrainConfig fields a suite may not set, and what to set instead
NOT_IN_SUITE = {"train": {"seed": "set the seed with suite.seed=<s> or suite.seeds=[...]"}}


#: more training steps than any plausible run (DiT-XL/2 trained 7M): a typo, refused with what it would cost
MAX_STEPS = 10**9


def steps_must(steps) -> str:
    years = steps * 1e-3 / (365.25 * 86400) if isinstance(steps, (int, float)) else 0
    cost = f"; {steps:,} steps would take {years:,.0f} years even at 1 ms a step" if years >= 1 else ""
    return f"> 0 (training steps) and at most 10^9{cost}"


def positive(x): return x > 0
def non_negative(x): return x >= 0
def _unit(x): return 0 <= x < 1
def one_of(*options): return lambda x: x in options


#: (section, key) -> (test, what the value must be); values None pass (optional keys)
RULES: Dict[tuple, tuple] = {
    ("train", "steps"): (lambda n: 0 < n <= MAX_STEPS, None),  # what it must be: steps_must
    ("train", "global_batch"): (positive, "> 0 (images per step, all processes together)"),
    ("train", "lr"): (lambda lr: 0 < lr <= 1, "> 0 and <= 1 (AdamW learning rate)"),
    ("train", "weight_decay"): (non_negative, ">= 0"),
    ("train", "betas"): (lambda b: len(b) == 2 and all(0 <= x < 1 for x in b), "two numbers in [0, 1)"),
    ("train", "ema_decay"): (_unit, "in [0, 1)"),
    ("train", "label_dropout"): (_unit, "in [0, 1) (the fraction of labels dropped for guidance)"),
    ("train", "precision"): (one_of(*PRECISIONS), "one of auto, fp32, bf16, fp16"),
    ("train", "grad_clip"): (positive, "> 0 (or null: no clipping)"),
    ("train", "checkpoint_every"): (non_negative, ">= 0 (0: only at the end)"),
    ("train", "log_every"): (positive, "> 0"),
    ("train", "warmup_steps_excluded"): (non_negative, ">= 0"),
    ("train", "fault_nan_at_step"): (positive, "> 0 (or null)"),
    ("train", "compile_blocks"): (one_of("auto", True, False), "auto, true or false (auto: compiled on CUDA only)"),
    ("train", "loader_workers"): (non_negative, ">= 0 (DataLoader processes reading latents; 0: none)"),
    ("eval", "every"): (non_negative, ">= 0 (0: only the final step)"),
    ("eval", "at"): (lambda a: all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in a),
                     "a list of positive step counts, e.g. [900, 1800, 3600] (or null)"),
    ("eval", "samples"): (non_negative, ">= 0 (0: no FID)"),
    ("eval", "batch"): (positive, "> 0"),
    ("eval", "sampler_steps"): (positive, "> 0"),
    ("eval", "sparse_guidance"): (lambda g: len(g) == 3, "three numbers [strong rate, weak rate, scale] (or null)"),
    ("eval", "uncond_rate"): (lambda r: 0 <= r <= 1, "in [0, 1] (the rate forced on classifier-free guidance's "
                              "unconditional branch; 1.0 with SPRINT is path-drop guidance)"),
    ("eval", "reference_limit"): (positive, "> 0 (or null: the whole split)"),
    ("eval", "vae_batch"): (positive, "> 0"),
    ("eval", "fid_at"): (one_of("every", "final"), "every or final"),
    ("eval", "loss_images"): (non_negative, ">= 0 (0: no held-out loss)"),
    ("eval", "loss_levels"): (positive, "> 0"),
    ("eval", "loss_batch"): (positive, "> 0"),
    ("eval", "grid_per_class"): (non_negative, ">= 0 (0: no sample grids)"),
    ("data", "resolution"): (positive, "> 0"),
    ("data", "channels"): (positive, "> 0"),
    ("data", "num_classes"): (positive, "> 0"),
    ("data", "limit"): (non_negative, ">= 0 (null or 0: all images)"),
    ("", "jobs"): (positive, ">= 1 (runs trained at a time)"),
}


def _schemas() -> Dict[str, type]:
    from tread_bench.training.trainer import TrainConfig
    from tread_bench.measure.evaluate import EvalConfig

    return {"train": TrainConfig, "eval": EvalConfig}


SUITES_DIR = Path(__file__).resolve().parents[2] / "suites"   # run_suite.py's Hydra config folder


def group_options(config_dir, group: str) -> List[str]:
    """The options of a config group: the names of ``<config_dir>/<group>/*.yaml``, sorted."""
    return sorted(p.stem for p in (Path(config_dir) / group).glob("*.yaml"))


def suggest(key: str, known) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def overlay_keys(path: Path) -> List[str]:
    """The dotted keys a scale overlay (suites/suite_scale/<suite>_<scale>.yaml) sets itself (its ``defaults`` are
    other files), at suite level: a ``# @package _global_`` file's ``suite.`` keys without the prefix, its
    ``scale.`` keys with it."""
    text = Path(path).read_text()
    tree = OmegaConf.to_container(OmegaConf.create(text)) or {}
    tree.pop("defaults", None)
    if "@package _global_" in text:
        tree = {**{f"scale.{k}": v for k, v in (tree.pop("scale", None) or {}).items()},
                **(tree.pop("suite", None) or {}), **tree}
    keys = []
    for key, value in tree.items():
        if key == "methods" and isinstance(value, dict):
            for entry, spec in value.items():
                keys += [f"methods.{entry}.{k}" for k in spec] if isinstance(spec, dict) else [f"methods.{entry}"]
        elif isinstance(value, dict) and key in ("train", "eval", "data"):
            keys += [f"{key}.{k}" for k in value]
        else:
            keys.append(key)
    return keys


def changes_what_runs(key: str) -> bool:
    """Whether a scale overlay's ``key`` changes which backbones, methods, routes or method arguments run: a scale
    changes size, data, schedule and evaluation only (a method entry's ``schedule``, the steps its fine-tune stages
    start at, is schedule)."""
    if key == "backbones":
        return True
    parts = key.split(".")
    return parts[0] == "methods" and not (len(parts) == 3 and parts[2] == "schedule")


def check_scale_overlay(suite_name: str, scale_name: str) -> None:
    """Refuse a scale overlay of this suite that changes what runs: one line naming the file and the key."""
    path = SUITES_DIR / "suite_scale" / f"{suite_name}_{scale_name}.yaml"
    if not path.exists():
        return
    for key in overlay_keys(path):
        if changes_what_runs(key):
            raise ConfigError(f"suites/suite_scale/{path.name} sets '{key}': a scale changes size, data, schedule "
                              f"and evaluation, never which backbones, methods, routes or method arguments run; "
                              f"remove it, or make the experiment a suite of its own (suites/suite/)")


def _typed(path: str, value: Mapping, schema: type) -> DictConfig:
    """``value`` merged into ``schema`` (a dataclass): unknown keys and unconvertible values are ConfigErrors.
    A value OmegaConf converts (the string "300" for an int) is refused too: the code reads the value as
    written, so it must already have its type."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path} must be a mapping of keys to values, got {value!r}")
    known = [f.name for f in dataclasses.fields(schema) if f.name not in NOT_IN_SUITE.get(path.split(".")[-1], {})]
    for key in value:
        if key not in known:
            raise ConfigError(f"unknown key '{path}.{key}'; {suggest(key, known)}the keys of {path} are: "
                              f"{', '.join(known)}")
    try:
        base = OmegaConf.structured(schema)
    except OmegaConfBaseException:  # a field type OmegaConf cannot check (a plug-in's): check the keys only
        return OmegaConf.create(dict(value))
    try:
        typed = OmegaConf.merge(base, dict(value))
    except (ValidationError, ConfigKeyError) as err:
        key = getattr(err, "full_key", None) or "?"
        first = str(err).splitlines()[0]
        default = getattr(schema, str(key).split(".")[0], None)
        example = f"; e.g. {path}.{key}={default}" if isinstance(default, (int, float, str)) else ""
        raise ConfigError(f"{path}.{key}: {first}{example}") from None
    for key, written in value.items():
        got = typed[key]
        if isinstance(got, (DictConfig, ListConfig)):
            got = OmegaConf.to_container(got)
        if not _same(got, written):
            raise ConfigError(f"{path}.{key} = {written!r} is a {type(written).__name__}; write it as {got!r}")
    return typed


def _same(typed, written) -> bool:
    """Whether the typed value is the value as written (a mapping: the keys written; defaults may add others)."""
    if isinstance(written, Mapping) and isinstance(typed, Mapping):
        return all(k in typed and _same(typed[k], v) for k, v in written.items())
    if isinstance(written, (list, tuple)) and isinstance(typed, (list, tuple)):
        return len(typed) == len(written) and all(_same(a, b) for a, b in zip(typed, written))
    if isinstance(written, bool) != isinstance(typed, bool):
        return False
    if isinstance(written, str) != isinstance(typed, str):
        return False
    return typed == written or (isinstance(typed, float) and math.isnan(typed) and isinstance(written, float)
                                and math.isnan(written))


def _default(schema: type, key: str):
    for f in dataclasses.fields(schema):
        if f.name == key:
            return f.default if f.default is not dataclasses.MISSING else None
    return None


def _check_values(path: str, section: str, values: Mapping, written: Mapping, schema: type,
                  rules: Optional[Mapping[str, tuple]] = None) -> None:
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):  # every float key: nan and inf never mean a setting
            default = _default(schema, key)
            fix = f"e.g. {path}.{key}={default}" if isinstance(default, (int, float)) else f"set {path}.{key}"
            raise ConfigError(f"{path}.{key} = {written[key]}: must be a finite number; {fix}")
        rule = rules.get(key) if rules is not None else RULES.get((section, key))
        if rule is None or value is None:
            continue
        test, must = rule
        must = steps_must(value) if must is None else must
        try:
            ok = test(value) and not (isinstance(value, float) and math.isnan(value))
        except TypeError:
            ok = False
        if not ok:
            default = _default(schema, key)
            fix = f"e.g. {path}.{key}={default}" if default is not None and test(default) else f"set {path}.{key}"
            raise ConfigError(f"{path}.{key} = {written[key]}: must be {must}; {fix}")


def check_section(path: str, section: str, value: Mapping, schema: type,
                  rules: Optional[Mapping[str, tuple]] = None) -> DictConfig:
    """One section (train, eval, data, ...) typed and checked; ``rules`` ({key: (test, must)}) replace
    :data:`RULES` (a suite kind's own keys)."""
    for key, fix in NOT_IN_SUITE.get(section, {}).items():
        if isinstance(value, Mapping) and key in value:
            raise ConfigError(f"{path}.{key} is not read from the suite: {fix}")
    typed = _typed(path, value, schema)
    _check_values(path, section, {k: typed[k] for k in value}, value, schema, rules)
    return typed


def check_method(name: str, entry, steps: Optional[int] = None) -> None:
    """One entry of suite.methods: null (removed by a scale), or ``{kind: <method kind> (default
    methods.DEFAULT_KIND), backbones: [names] (optional filter), schedule: [{step, <settings>}] (optional;
    tread_bench/methods/schedule.py), <the kind's own arguments>}``: the names of the arguments are checked here,
    their values by the method when validate_run builds it. ``steps``: the suite's training steps (schedule steps
    must be below)."""
    from tread_bench.methods import DEFAULT_KIND, parse_schedule

    path = f"suite.methods.{name}"
    if entry is None:
        return
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{path} must be a mapping such as {{routes: [\"2->8@0.5\"]}}, got {entry!r}")
    kind = entry.get("kind", DEFAULT_KIND)
    if not isinstance(kind, str):
        raise ConfigError(f"{path}.kind must be the name of a method kind, got {kind!r}")
    only = entry.get("backbones")
    if only is not None and (not isinstance(only, (list, tuple)) or not all(isinstance(b, str) for b in only)):
        raise ConfigError(f"{path}.backbones must be a list of backbone names, e.g. [dit], got {only!r}")
    args = {k: v for k, v in entry.items() if k not in ("kind", "backbones", "schedule")}
    accepted = method_arguments(kind)
    if accepted is not None:
        for key in args:
            if key not in accepted:
                keys = ['kind', 'backbones', *accepted, 'schedule']
                raise ConfigError(f"unknown key '{path}.{key}' for a method of kind {kind}; "
                                  f"{suggest(key, keys)}its keys are: {', '.join(keys)}")
    parse_schedule(entry.get("schedule"), f"{path}.schedule", kind, steps)  # values: by the method, at validate_run


def root_keys() -> List[str]:
    """The top-level keys a composed configuration may have: suites/config.yaml's own, the suite, the scale."""
    own = OmegaConf.load(Path(__file__).resolve().parents[2] / "suites" / "config.yaml")
    return ["suite", "scale"] + [k for k in own if k not in ("defaults", "hydra")]


def check_output_folder(key: str, path: str) -> None:
    """``path`` is a folder this process can write, or one it can create: a folder is made and removed in it, or in
    the nearest folder above it that exists (nothing is left behind)."""
    folder = Path(path)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"is under {existing}, which is a file"
        raise ConfigError(f"{key}={path} {where}, not a folder; give {key} a folder path")
    try:  # tried, not asked (os.access): root passes every permission check, yet cannot write in /proc
        probe = tempfile.mkdtemp(prefix=".tread-write-probe-", dir=existing)
    except OSError as err:
        what = "cannot be written" if existing == folder else f"cannot be created in {existing}"
        raise ConfigError(f"{key}={path} {what} ({err.strerror}); give {key} a folder you can write") from None
    os.rmdir(probe)


def check_root(cfg: DictConfig) -> None:
    """The keys of config.yaml besides the suite: names, types and values."""
    known = root_keys()
    for key in cfg:
        if key not in known:
            raise ConfigError(f"unknown top-level key '{key}'; {suggest(key, known)}the top-level keys are: "
                              f"{', '.join(known)}")
    device = cfg.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device = {device}: must be auto, cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device=cuda, but torch {torch.__version__} sees no CUDA GPU here; use device=auto "
                              "(CUDA when there is one, else the CPU) or device=cpu")
    for key in ("force", "report", "plan"):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(f"{key} = {cfg.get(key)!r}: must be true or false")
    tracker = cfg.get("tracker", "none")
    if tracker not in ("tensorboard", "wandb", "none"):
        raise ConfigError(f"tracker = {tracker}: must be tensorboard, wandb or none")
    mfu = cfg.get("plan_mfu")
    if mfu is not None and (isinstance(mfu, bool) or not isinstance(mfu, (int, float)) or not 0 < mfu <= 1):
        raise ConfigError(f"plan_mfu = {mfu!r}: must be in (0, 1] (the fraction of the GPU's peak FLOP/s a run "
                          "achieves), or null for the MFU of public figures by width; e.g. plan_mfu=0.3")
    gpus = cfg.get("plan_gpus", 8)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"plan_gpus = {gpus!r}: must be a whole number >= 1 (GPUs sharing the global batch); "
                          "e.g. plan_gpus=8")
    for key in ("results_dir", "runs_dir"):
        if not isinstance(cfg.get(key), str) or not cfg.get(key):
            raise ConfigError(f"{key} = {cfg.get(key)!r}: must be a folder path")
        check_output_folder(key, cfg.get(key))
    only = cfg.get("only")
    if only is not None and not isinstance(only, str):
        raise ConfigError(f"only = {only!r}: must be a substring of run names, in quotes: only='{only}'")
    scale = cfg.get("scale") or {}
    if scale.get("name") not in ("full", "cpu", "tiny", "auto", "dryrun"):
        raise ConfigError(f"scale = {scale.get('name')}: must be auto, full, cpu, tiny or dryrun")


def validate_suite(cfg: DictConfig) -> Dict[str, DictConfig]:
    """Check the composed configuration (``scale=auto`` already resolved) against the shared schema and its suite
    kind's registered keys. Returns its sections typed, with defaults filled in ({"suite", "data", "train",
    "eval"}, and the kind's own keys under "kind"; for reading only: the runs use the suite as written, so their
    configuration hashes do not change). Raises ConfigError: one line naming the key and the fix."""
    check_root(cfg)
    check_scale_overlay(str(cfg.suite.get("name")), str((cfg.get("scale") or {}).get("name")))
    try:
        suite = OmegaConf.to_container(cfg.suite, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"suite: {str(err).splitlines()[0]}") from None
    if not isinstance(suite, dict):
        raise ConfigError(f"suite must be a mapping, got {suite!r}")
    kind_name = suite.get("kind", "train")
    if kind_name not in SUITE_KINDS:
        raise ConfigError(f"suite {suite.get('name')}: unknown kind '{kind_name}'; one of {', '.join(SUITE_KINDS.names())}")
    kind = SUITE_KINDS[kind_name]
    sections = _schemas()
    shared = [f.name for f in dataclasses.fields(SuiteSchema)]
    own = [f.name for f in dataclasses.fields(kind.keys)] if kind.keys else []
    top_known = shared + list(sections) + own
    for key in suite:
        if key in top_known:
            continue
        owners = [k for k in SUITE_KINDS.names() if SUITE_KINDS[k].keys
                  and key in {f.name for f in dataclasses.fields(SUITE_KINDS[k].keys)}]
        if owners:
            raise ConfigError(f"suite.{key} is read by {' and '.join(owners)} suites only, and this suite's kind is "
                              f"{kind_name}; remove it")
        raise ConfigError(f"unknown key 'suite.{key}'; {suggest(key, top_known)}the keys of a {kind_name} suite are: "
                          f"{', '.join(top_known)}")
    if "name" not in suite:
        raise ConfigError("suite.name is missing; every suite names itself (name: <suite>)")
    typed = {"suite": check_section("suite", "", {k: v for k, v in suite.items() if k in shared and k != "data"},
                                    SuiteSchema),
             "data": check_section("suite.data", "data", suite.get("data") or {}, DataSchema)}
    if kind.keys:
        typed["kind"] = check_section("suite", kind_name, {k: v for k, v in suite.items() if k in own}, kind.keys,
                                      kind.rules)
    for key, schema in sections.items():
        if suite.get(key) is not None:
            typed[key] = check_section(f"suite.{key}", key, suite[key], schema)
    for k, entry in enumerate(suite.get("backbones") or []):
        check_section(f"suite.backbones[{k}]", "backbone", entry, BackboneSchema)
        if not entry.get("name"):
            raise ConfigError(f"suite.backbones[{k}] has no name; write it as {{name: dit, size: S/2}}")
    if not suite.get("backbones"):
        raise ConfigError(f"suite {suite['name']}: suite.backbones is empty; list at least one, e.g. "
                          "[{name: dit, size: S/2}]")
    methods = suite.get("methods") or {}
    steps = (suite.get("train") or {}).get("steps")
    for name, entry in methods.items():
        check_method(str(name), entry, steps if isinstance(steps, int) and not isinstance(steps, bool) else None)
    if not any(e is not None for e in methods.values()):
        raise ConfigError(f"suite {suite['name']}: suite.methods is empty; add one, e.g. baseline: {{routes: []}}")
    _check_objective(suite.get("objective"))
    seeds = suite.get("seeds")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"suite.seeds = {seeds}: must be a non-empty list of distinct integers, e.g. [0, 1, 2]")
    if kind.check is not None:
        kind.check(suite)
    limit, batch = (suite.get("data") or {}).get("limit"), (suite.get("train") or {}).get("global_batch")
    if isinstance(limit, int) and isinstance(batch, int) and 0 < limit < batch:
        raise ConfigError(f"suite.data.limit = {limit} images is below suite.train.global_batch = {batch}: every step "
                          f"would draw images twice; raise suite.data.limit to at least {batch} or lower the batch")
    check_uncond_rate("suite.eval", suite.get("eval") or {})
    check_flop_match(suite)
    if kind.trains and not cfg.get("plan") and not cfg.get("report"):
        from tread_bench.engine.tracking import check_tracker

        check_tracker(cfg.get("tracker", "none"))  # its package installed: refused before any training
    if (cfg.get("scale") or {}).get("name") == "dryrun" and not suite.get("dryrun"):
        raise ConfigError(f"scale=dryrun runs the paper suites ({', '.join(DRYRUN_SUITES)}); suite {suite['name']} "
                          f"has no suites/suite_scale/{suite['name']}_dryrun.yaml (one line: defaults: [common_dryrun])")
    if cfg.get("plan") and (suite.get("train") is None or not suite.get("backbones")):
        raise ConfigError(f"plan=true plans suites that train; suite {suite['name']} (kind {kind_name}) trains nothing")
    return typed


def check_flop_match(suite: Mapping) -> None:
    """suite.eval.flop_match names the method entry whose runs evaluate at the other methods' training FLOPs."""
    name = (suite.get("eval") or {}).get("flop_match")
    if name is None:
        return
    methods = [m for m, entry in (suite.get("methods") or {}).items() if entry is not None]
    if name not in methods:
        raise ConfigError(f"suite.eval.flop_match = {name!r} is not a method of suite {suite['name']}; "
                          f"{suggest(str(name), methods)}its methods: {', '.join(methods)}")


def check_uncond_rate(path: str, spec: Mapping) -> None:
    """uncond_rate forces the rate of CFG's unconditional branch: meaningless without CFG, and selection-rate
    guidance (which replaces CFG) would silently ignore it."""
    if spec.get("uncond_rate") is None:
        return
    if spec.get("sparse_guidance"):
        raise ConfigError(f"{path}: uncond_rate (CFG's unconditional branch) and sparse_guidance exclude each other; "
                          "keep one")
    if spec.get("cfg_scale", 1.0) == 1.0:
        raise ConfigError(f"{path}.uncond_rate forces the rate of classifier-free guidance's unconditional branch; "
                          "set cfg_scale != 1 beside it, e.g. {cfg_scale: 1.5, uncond_rate: 1.0}")


def _check_objective(objective) -> None:
    """suite.objective: {name: <objective>, <its arguments>} (suites/objective/), built once to check it."""
    if objective is None:
        return
    if not isinstance(objective, Mapping) or not isinstance(objective.get("name", "edm"), str):
        raise ConfigError(f"suite.objective must be a mapping such as {{name: edm}}, got {objective!r}; "
                          "pick one with objective=<name>")
    try:
        from diffusion import build_objective
    except ImportError:
        return
    build_objective(**objective)   # unknown names and arguments are ConfigErrors


# ------------------------------------------------------------------------------------------------
# Before Hydra: command-line overrides that Hydra itself would refuse with a multi-line message
# ------------------------------------------------------------------------------------------------
def _override_errors(overrides: List[str], config_dir: str) -> Optional[str]:
    """Compose ``overrides`` as Hydra will; for the two mistakes Hydra reports in several lines (a key the
    config does not have, written without ``+``; a suite, scale or objective that does not exist), the one
    line that says what to change. None when composition succeeds or fails in any other way (Hydra then
    reports it as usual: sweeps, syntax)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        try:
            compose("config", overrides=overrides)
            return None
        except MissingConfigException as err:
            pairs = [(o.split("=", 1)[0].lstrip("+~"), o.split("=", 1)[1]) for o in overrides if "=" in o]
            missing = [(g, v) for g, v in pairs if f"'{g}/{v}'" in str(err)]
            if not missing:
                return None
            group, value = missing[-1]
            options = group_options(config_dir, group)
            return (f"unknown {group} '{value}'; {suggest(value, options)}choose one of {', '.join(options)}")
        except ConfigCompositionException as err:
            cause = err.__cause__
            if not isinstance(cause, ConfigKeyError) and "not in struct" not in str(cause):
                return None
            full_key = getattr(cause, "full_key", None) or str(cause).split("full_key:")[-1].split()[0]
            # the missing key may be an intermediate one: `suite.trian.steps=3` lacks `suite.trian`
            written = next((o for o in overrides if o.split("=", 1)[0] == full_key
                            or o.split("=", 1)[0].startswith(full_key + ".")), f"{full_key}=...")
            parent, _, leaf = full_key.rpartition(".")
            rest = [o for o in overrides if o != written]
            try:
                node = compose("config", overrides=rest)
                known = list(OmegaConf.select(node, parent).keys()) if parent else list(node.keys())
            except Exception:  # noqa: BLE001 - the suggestion is a courtesy; the message stands without it
                known = []
            where = (f"the keys of {parent or 'the top level'} are: {', '.join(map(str, known))}" if known
                     else "check its spelling")
            return (f"unknown key '{full_key}'; {suggest(leaf, known)}{where} "
                    f"(to add a key the config does not have, write +{written})")
        except Exception:  # noqa: BLE001 - anything else is Hydra's to report
            return None


def check_command_line(argv: List[str], config_dir: str) -> Optional[str]:
    """The one-line error for the command line ``argv`` (run_suite.py's arguments), or None. Multirun sweeps
    and Hydra's own flags are left to Hydra."""
    if any(a in ("-m", "--multirun") for a in argv):
        return None
    overrides = [a for a in argv if not a.startswith("-") and "=" in a and not a.startswith(("hydra.", "hydra/"))]
    return _syntax_error(overrides) or _override_errors(overrides, config_dir)


def _syntax_error(overrides: List[str]) -> Optional[str]:
    """One line for an override Hydra's grammar cannot read (a route such as 2->20@0.5 or a non-ASCII path
    unquoted), with the quoted form that it reads."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            key, _, value = override.partition("=")
            if value.startswith("[") and value.endswith("]"):
                quoted = "[" + ",".join(f"'{v.strip()}'" for v in value[1:-1].split(",") if v.strip()) + "]"
            else:
                quoted = f"'{value}'"
            return (f"cannot read the override {override} (Hydra's override grammar); quote the value, "
                    f"with the whole argument in double quotes for the shell: \"{key}={quoted}\"")
    return None
