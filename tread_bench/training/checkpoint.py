"""Training checkpoints that are safe to share: a folder ``<run>/checkpoint/`` holding ``model.safetensors``,
``ema.safetensors``, ``state.pt`` (plain types only, read with ``torch.load(weights_only=True)``) and
``manifest.json`` (written last). Atomic: written into ``checkpoint.new/``, then the current folder is renamed to
``checkpoint.old/``, ``checkpoint.new/`` to ``checkpoint/``, and ``checkpoint.old/`` is deleted. A checkpoint that
cannot be read raises :class:`tread_bench.core.errors.CheckpointError` with one line naming the file and the fix.
Details: docs/internals.md#tread_benchtrainingcheckpointpy
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch.optim.swa_utils import AveragedModel

from tread_bench.core.errors import CheckpointError
from tread_bench.core.io import atomic_write_text

__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "delete_checkpoint",
           "CHECKPOINT_DIR", "CHECKPOINT_PATHS", "CheckpointError"]

FORMAT = "tread-bench-checkpoint/2"  # /2: the manifest holds each file's SHA-256, checked on load
CHECKPOINT_DIR = "checkpoint"
OLD_FORMAT_FILE = "checkpoint.pt"  # found so that it is refused in one line, and deleted on force
MODEL, EMA, STATE, MANIFEST = "model.safetensors", "ema.safetensors", "state.pt", "manifest.json"
# every path of a run folder that holds checkpoint state (tread_bench.engine.resume deletes them together)
CHECKPOINT_PATHS = (CHECKPOINT_DIR, CHECKPOINT_DIR + ".new", CHECKPOINT_DIR + ".old", OLD_FORMAT_FILE)


def _fix(path: Path) -> str:
    return (f"delete {path} (the run then trains from its start) or rerun the suite with force=true")


def _error(file: Path, what: str, err: BaseException | str, folder: Path) -> CheckpointError:
    reason = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    reason = " ".join(str(reason).split())[:300]  # one line
    return CheckpointError(f"cannot read checkpoint file {file} ({what}: {reason}); {_fix(folder)}")


def find_checkpoint(run_dir) -> Path | None:
    """The checkpoint a run in ``run_dir`` resumes: the complete folder (see the module docstring), else an old
    ``checkpoint.pt`` (which load_checkpoint refuses in one line), else None."""
    run_dir = Path(run_dir)
    main, new, old = (run_dir / p for p in CHECKPOINT_PATHS[:3])
    if main.exists():
        return main
    for folder in (new, old):  # a kill between the two renames of save_checkpoint
        if (folder / MANIFEST).exists():
            return folder
    old = run_dir / OLD_FORMAT_FILE
    return old if old.exists() else None


def _check_plain(obj, where: str) -> None:
    """Refuse, at save time, what ``torch.load(weights_only=True)`` would refuse at load time."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype, torch.Size)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint state {where} is a {type(obj).__qualname__}; only tensors, numbers, strings "
                    "and lists/dicts of them are saved (weights_only loading refuses other types)")


def plain_json(obj):
    """``obj`` as JSON types (numpy scalars -> Python numbers, paths -> str); floats round-trip exactly."""
    def default(o):
        if hasattr(o, "item"):
            return o.item()
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def file_sha256(file: Path) -> str:
    """The file's SHA-256, hex (read in 1 MiB chunks)."""
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(folder, model: torch.nn.Module, ema: torch.nn.Module, state: dict) -> None:
    """Write ``model`` and ``ema`` (modules) as safetensors and ``state`` (plain types) as state.pt into
    ``folder``, replacing the checkpoint there as a whole. ``state["step"]`` is recorded in the manifest."""
    folder = Path(folder)
    _check_plain(state, "state")
    new, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    if not folder.exists():  # finish a save killed between its renames before starting this one
        done = find_checkpoint(folder.parent) if folder.name == CHECKPOINT_DIR else None
        if done is not None and done.is_dir():
            os.rename(done, folder)
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    save_model(model, str(new / MODEL), metadata={"format": FORMAT, "step": str(state.get("step"))})
    save_model(ema, str(new / EMA), metadata={"format": FORMAT, "step": str(state.get("step"))})
    torch.save(state, new / STATE)
    for name in (MODEL, EMA, STATE):
        with open(new / name, "rb+") as f:
            os.fsync(f.fileno())
    manifest = {"format": FORMAT, "step": state.get("step"),
                "files": {name: {"bytes": (new / name).stat().st_size, "sha256": file_sha256(new / name)}
                          for name in (MODEL, EMA, STATE)}}
    atomic_write_text(new / MANIFEST, json.dumps(manifest, indent=1))
    _fsync_dir(new)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(new, folder)
    _fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)
    (folder.parent / OLD_FORMAT_FILE).unlink(missing_ok=True)  # the folder just saved replaces it


def _refused_object(err: BaseException) -> str | None:
    """The object torch's weights_only unpickler refused (one line of its message), or None when ``err`` is not
    such a refusal. Only that line: the rest of torch's message suggests loading the file unsafely."""
    text = str(err)
    if "Weights only load failed" not in text and "WeightsUnpickler error" not in text:
        return None
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    for line in lines:
        if line.startswith(("Trying to load unsupported GLOBAL", "Unsupported global", "WeightsUnpickler error")):
            return line.split(". Please use")[0].split(" was not an allowed global")[0]
    return "an object torch.load(weights_only=True) does not load"


def _load_state(file: Path, folder: Path) -> dict:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise _error(file, "missing", err, folder) from None
    except Exception as err:  # corrupt, truncated, or a pickled object (refused by weights_only, never run)
        refused = _refused_object(err)
        if refused is not None:
            raise _error(file, "not plain tensors and values: it holds a pickled object, which is never loaded "
                         "since loading it could run its code", refused, folder) from None
        raise _error(file, "corrupt or truncated", err, folder) from None
    if not isinstance(state, dict) or "step" not in state:
        raise _error(file, "unreadable", "not a training state (no 'step')", folder)
    return state


def _verified_state(path) -> dict:
    """The training state of the checkpoint folder at ``path`` once its manifest and every file are checked
    (format, sizes, SHA-256, one step); a CheckpointError (one line: the file and the fix) otherwise."""
    path = Path(path)
    if path.name == OLD_FORMAT_FILE:
        raise CheckpointError(f"{path} is a checkpoint of a tread-bench version before checkpoint folders, which this "
                              f"version does not read; rerun the suite with force=true (or delete {path})")
    manifest_file = path / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
    except FileNotFoundError:
        raise _error(manifest_file, "missing", "the checkpoint was not completed", path) from None
    except (OSError, ValueError) as err:
        raise _error(manifest_file, "unreadable", err, path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _error(manifest_file, "unknown format", f"expected {FORMAT}", path)
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {MODEL, EMA, STATE} or not all(
            isinstance(v, dict) and {"bytes", "sha256"} <= set(v) for v in files.values()):
        raise _error(manifest_file, "unreadable", f"its files must be {MODEL}, {EMA} and {STATE}, each with bytes "
                     "and sha256", path)
    for name, expected in files.items():
        file = path / name
        if not file.exists():
            raise _error(file, "missing", "listed in the manifest", path)
        if file.stat().st_size != expected["bytes"]:
            raise _error(file, "truncated or replaced", f"{file.stat().st_size} bytes, the manifest says "
                         f"{expected['bytes']}", path)
        if file_sha256(file) != expected["sha256"]:
            raise _error(file, "damaged", "its SHA-256 is not the one the manifest recorded when it was written",
                         path)
    state = _load_state(path / STATE, path)
    if state["step"] != manifest.get("step"):
        raise _error(path / STATE, "mixed checkpoint", f"step {state['step']}, the manifest says "
                     f"{manifest.get('step')}", path)
    return state


def _load_weights(path: Path, name: str, module: torch.nn.Module) -> None:
    try:
        load_model(module, str(path / name), strict=True)
    except Exception as err:  # header or data damaged, or weights of another model
        raise _error(path / name, "unreadable or not this model's weights", err, path) from None


def load_checkpoint(path, model: torch.nn.Module, ema: torch.nn.Module) -> dict:
    """Load the checkpoint folder at ``path`` into ``model`` and ``ema``; return the rest of the state (optimizer,
    step counters, RNG states, stats, ...)."""
    path = Path(path)
    state = _verified_state(path)
    for name, module in ((MODEL, model), (EMA, ema)):
        _load_weights(path, name, module)
    return state


def load_ema(path, denoiser: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """(a copy of ``denoiser`` holding the EMA weights of the checkpoint folder at ``path``, its step): a finished
    run's model for sampling, without building its optimizer or trainer. Checked as load_checkpoint checks."""
    path = Path(path)
    state = _verified_state(path)
    container = AveragedModel(denoiser, use_buffers=True)  # the trainer's EMA container: the file's keys
    _load_weights(path, EMA, container)
    return container.module, state["step"]


def delete_checkpoint(run_dir) -> None:
    """Delete every checkpoint path of a run folder (a finished dry run's: written, so the save is exercised; its
    weights are worth nothing)."""
    for name in CHECKPOINT_PATHS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
