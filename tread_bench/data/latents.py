"""Precomputed latent arrays: a folder of shards plus ``meta.json``, read out of core.

``meta.json`` names the shape, scaling_factor, num_classes and shards; ``latents_<k>.npy`` holds (n, C, H, W)
float16/float32 already multiplied by scaling_factor, ``labels_<k>.npy`` (n,) integer labels. Only the labels stay in memory: ``images[idx]`` reads rows with positional reads (``os.preadv``), not a
memory map, so the process's memory stays flat as the set grows. Shape, dtype and scaling are checked at start.
Details: docs/internals.md#tread_benchdatalatentspy
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write

from .imageset import ImageSet

SD_VAE_SCALING = 0.18215


def labels_name(latents_name: str) -> str:
    """``latents_00000.npy`` -> ``labels_00000.npy`` (the pair the encoder writes)."""
    return "labels_" + latents_name[len("latents_"):]


def _npy_header(f, start: int, where: str):
    """(shape, dtype, data offset) of a .npy stream that starts at byte ``start`` of the open file ``f``."""
    f.seek(start)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as err:
        raise ConfigError(f"{where} is not a readable .npy array ({err}); re-encode this shard") from None
    if fortran and len(shape) > 1:
        raise ConfigError(f"{where} is stored in Fortran order; re-save it C-contiguous (np.save of np.ascontiguousarray)")
    return tuple(shape), dtype, f.tell()


class ShardedLatents:
    """A read-only (N, C, H, W) float32 view of latent rows stored across shard files.

    ``view[idx]`` reads only the rows asked for (one positional read per row, in file order) and converts
    them to float32 per batch; nothing else of the set is kept in memory. Picklable (DataLoader workers
    reopen the files in their own process)."""

    def __init__(self, parts: list[tuple[str, int, int]], shape, dtype, length: int | None = None):
        self.parts = list(parts)                     # (file, byte offset of row 0, rows)
        self.row_shape = tuple(int(s) for s in shape)
        self.disk_dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape)) * self.disk_dtype.itemsize
        self.starts = np.cumsum([0] + [n for _, _, n in self.parts])
        total = int(self.starts[-1])
        self.length = total if length is None else min(int(length), total)
        self._fds: dict[int, int] = {}
        self._pid = None

    # -- tensor-like surface ----------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.length, *self.row_shape))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what indexing returns

    def dim(self) -> int:
        return 1 + len(self.row_shape)

    def __len__(self) -> int:
        return self.length

    def head(self, n: int) -> "ShardedLatents":
        """The first ``n`` rows, still out of core."""
        return ShardedLatents(self.parts, self.row_shape, self.disk_dtype, min(int(n), self.length))

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            return self.read(np.arange(self.length)[key])
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            i = int(key)
            return self.read(np.array([i + self.length if i < 0 else i]))[0]
        if isinstance(key, torch.Tensor):
            if key.dtype == torch.bool:
                key = key.nonzero().flatten()
            key = key.cpu().numpy()
        return self.read(np.asarray(key, dtype=np.int64))

    def __iter__(self):
        for i in range(self.length):
            yield self[i]

    def __repr__(self) -> str:
        return (f"ShardedLatents({tuple(self.shape)}, {self.disk_dtype} on disk, {len(self.parts)} shards)")

    # -- reading ------------------------------------------------------------------------------
    def read(self, idx: np.ndarray, on_disk_dtype: bool = False) -> torch.Tensor:
        """float32 tensor (len(idx), C, H, W) of the rows ``idx`` (global indices, negatives count from the end);
        in the on-disk dtype with ``on_disk_dtype`` (DataLoader workers: half the bytes to pass on and copy to
        the GPU, converted there)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + self.length, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self.length):
            raise IndexError(f"latent index out of range for {self.length} latents")
        out = np.empty((len(idx), *self.row_shape), self.disk_dtype)
        order = np.argsort(idx, kind="stable")  # file order: sequential within a shard
        shard = np.searchsorted(self.starts, idx[order], side="right") - 1
        rows = idx[order] - self.starts[shard]
        for j, s, r in zip(order.tolist(), shard.tolist(), rows.tolist()):
            path, offset, _ = self.parts[s]
            self._read_row(self._fd(s), out[j], offset + r * self.row_bytes, path)
        x = torch.from_numpy(out)
        return x if on_disk_dtype else x.float()

    def _read_row(self, fd: int, dest: np.ndarray, offset: int, path: str) -> None:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [dest], offset)
        else:  # platforms without preadv
            buf = os.pread(fd, self.row_bytes, offset)
            got = len(buf)
            dest[...] = np.frombuffer(buf, self.disk_dtype).reshape(self.row_shape)
        if got != self.row_bytes:
            raise ConfigError(f"{path} is truncated (short read at byte {offset}); re-encode this shard")

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # after a fork (DataLoader workers): own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(s)
        if fd is None:
            fd = self._fds[s] = os.open(self.parts[s][0], os.O_RDONLY)
        return fd

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass


def save_npy(path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _open_shard(root: Path, name: str):
    """(latents file, byte offset, shape, dtype, labels array) of one shard, without reading its latents."""
    shard = root / name
    if name.endswith(".npz"):
        raise ConfigError(f"latent shard {shard} is an .npz, which this version does not read; re-encode the folder with "
                          "python -m tread_bench.data.encode_latents (latents_<id>.npy + labels_<id>.npy shards)")
    if not name.endswith(".npy") or not name.startswith("latents_"):
        raise ConfigError(f"latent shard name '{name}' in {root / 'meta.json'} is not latents_<id>.npy (with "
                          "labels_<id>.npy beside it); fix meta.json")
    label_file = root / labels_name(name)
    for f in (shard, label_file):
        if not f.exists():
            raise ConfigError(f"missing latent shard {f}; re-run the encoder (it resumes) or fix "
                              "suite.data.kwargs.path")
    with open(shard, "rb") as f:
        shape, dtype, offset = _npy_header(f, 0, str(shard))
    return shard, offset, shape, dtype, _load_labels(label_file)


def _load_labels(file: Path) -> np.ndarray:
    """A shard's labels: a plain integer .npy (never unpickled), else one line naming the file."""
    try:
        labels = np.load(file, allow_pickle=False)
    except ValueError as err:  # pickled objects, or bytes that are not an .npy array
        raise ConfigError(f"{file} is not a plain .npy array of labels ({' '.join(str(err).split())[:120]}); "
                          "re-encode this shard") from None
    except OSError as err:
        raise ConfigError(f"{file} cannot be read ({err}); re-encode this shard") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{file} holds {labels.dtype} {labels.shape}, not a 1-D array of integer labels; "
                          "re-encode this shard")
    return labels


def load_latents(path: str | None, expected_resolution: int | None = None, expected_channels: int | None = None,
                 expected_scaling: float | None = SD_VAE_SCALING, limit: int | None = None):
    if not path:
        raise ConfigError("no latent folder given: set suite.data.kwargs.path (or IMAGENET_LATENTS) to a folder "
                          "with meta.json, made by `python -m tread_bench.data.encode_latents --images <image folder> --out <latent folder>`")
    root = Path(path)
    meta_file = root / "meta.json"
    if not meta_file.exists():
        raise ConfigError(f"missing {meta_file}: suite.data.kwargs.path must be a latent folder; make one with "
                          f"`python -m tread_bench.data.encode_latents --images <image folder> --out <latent folder>`")
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{meta_file} is not JSON ({' '.join(str(err).split())[:120]}); re-run the encoder "
                          "(it resumes) or restore the file") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{meta_file} must hold a JSON object with shape, scaling_factor, num_classes and shards")
    shape = tuple(meta.get("shape", ()))
    if len(shape) != 3:
        raise ConfigError(f"{meta_file}: 'shape' must be [C, H, W], got {shape}")
    if expected_resolution is not None and shape[1:] != (expected_resolution, expected_resolution):
        raise ConfigError(f"latents in {root} are {shape[1]}x{shape[2]} but data.resolution is {expected_resolution}; "
                          "set data.resolution to match")
    if expected_channels is not None and shape[0] != expected_channels:
        raise ConfigError(f"latents in {root} have {shape[0]} channels, the model expects {expected_channels} "
                          f"(shape {shape}; an (8, H, W) shape means mean+logvar were stored instead of a sample)")
    scaling = meta.get("scaling_factor")
    if expected_scaling is not None and (scaling is None or abs(scaling - expected_scaling) > 1e-6):
        raise ConfigError(f"latents in {root} were stored with scaling_factor {scaling}, expected {expected_scaling}; "
                          "re-encode or set data.scaling_factor")
    parts, ys, dtype, count = [], [], None, 0
    for name in meta.get("shards", []):
        file, offset, x_shape, x_dtype, y = _open_shard(root, name)
        if (x_dtype not in (np.float16, np.float32) or tuple(x_shape[1:]) != shape or x_shape[0] != len(y)
                or (dtype is not None and x_dtype != dtype)):
            raise ConfigError(f"{root / name}: latents {x_dtype} {tuple(x_shape)} do not match meta shape {shape} "
                              f"with {len(y)} labels (and the dtype of the other shards); re-encode this shard")
        if os.path.getsize(file) < offset + x_shape[0] * int(np.prod(shape)) * x_dtype.itemsize:
            raise ConfigError(f"{file} is truncated; re-encode this shard")
        dtype = x_dtype
        parts.append((str(file), offset, int(x_shape[0])))
        ys.append(torch.from_numpy(np.asarray(y).astype(np.int64)))
        count += len(y)
        if limit and count >= limit:
            break
    if not parts:
        raise ConfigError(f"no shards listed in {meta_file}; the encoding did not finish")
    images = ShardedLatents(parts, shape, dtype, limit or None)
    labels = torch.cat(ys)[:len(images)]
    num_classes = int(meta.get("num_classes", int(labels.max()) + 1))
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"labels in {root} run from {int(labels.min())} to {int(labels.max())}, outside the "
                          f"{num_classes} classes {meta_file} names (0 to {num_classes - 1}); fix num_classes in "
                          "meta.json or re-encode")
    return ImageSet(images, labels, num_classes, f"latents:{root.name}")


def write_latent_shards(folder: str | os.PathLike, latents: np.ndarray, labels: np.ndarray, shard_size: int,
                        num_classes: int | None = None, scaling: float = SD_VAE_SCALING, **meta_extra) -> dict:
    """Write arrays as a latent folder (``latents_XXXXX.npy`` + ``labels_XXXXX.npy`` pairs and meta.json);
    for tests, benchmarks and hand-made sets."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for s, lo in enumerate(range(0, len(latents), shard_size)):
        name = f"latents_{s:05d}.npy"
        x, y = np.ascontiguousarray(latents[lo:lo + shard_size]), np.asarray(labels[lo:lo + shard_size], np.int64)
        atomic_write(root / labels_name(name), lambda tmp: save_npy(tmp, y))
        atomic_write(root / name, lambda tmp: save_npy(tmp, x))
        names.append(name)
    meta = {"shape": list(latents.shape[1:]), "scaling_factor": scaling,
            "num_classes": int(num_classes if num_classes is not None else labels.max() + 1),
            "shards": names, "count": len(latents), **meta_extra}
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


class BatchRows:
    """A map-style dataset over an out-of-core image view whose batched fetch reads the whole batch at once
    (DataLoader workers call ``__getitems__`` with a step's indices)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]

    def __getitems__(self, indices):  # the on-disk dtype: converted to float32 after the copy to the device
        return self.images.read(np.asarray(indices, dtype=np.int64), on_disk_dtype=True)


class BatchSampler:
    """A DataLoader batch sampler over what ``make()`` yields (lists of indices, one per step)."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return self.make()


def whole_batch(batch):
    """The DataLoader's collate function for :class:`BatchRows`: its batch is already one tensor."""
    return batch
