"""The fused CPU selective scan: ``mamba_cpu_scan.cpp`` built with the system C++ compiler at first use.

Mamba's scan has no CPU kernel in ``mamba_ssm``; run eagerly in PyTorch it costs several times
DiT's time per training FLOP (``benchmarks/bench_step_per_flop.py``). This module compiles the C++
scan once per machine (``$TREAD_BENCH_CACHE``, default ``~/.cache/tread-bench``, keyed by the
source, the flags and the CPU's instruction set), loads it with ctypes and wraps it in an autograd
Function with the pure path's interface. When no compiler is found or the build fails, :func:`load`
returns None, says why once, and ``backbones.mamba`` keeps its pure-PyTorch scan. ``TREAD_CPU_SCAN=0``
switches the kernel off.

Whoever can write the cache runs code in every Mamba run, so the cache must be private: it is created
owner-only (0o700), and one owned by another user or writable by group or others is not used (one
warning; the library is built in a fresh private directory for this process instead). The library's
SHA-256 is recorded beside it at build time (``<name>.so.sha256``, ``sha256sum -c`` format) and checked
before every load; a library that does not match is rebuilt, never loaded.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch.nn import functional as F

SOURCE = Path(__file__).with_name("mamba_cpu_scan.cpp")
# -ffast-math lets GCC vectorise exp/log1p through glibc's libmvec and reassociate the sums over
# channels; it is given to the compile step only: linking with it would add crtfastmath, which sets
# flush-to-zero for the whole process.
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c++17"]
_POINTER, _LONG, _INT = ctypes.c_void_p, ctypes.c_long, ctypes.c_int


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags: a library built with -march=native for one CPU must
    not be loaded on another (a cache shared over NFS between cluster nodes)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


class UnsafeCacheError(Exception):
    """The cache directory can be written by someone else: what it holds cannot be trusted."""


def unsafe_reason(path: Path) -> str:
    """Why ``path`` (a cache directory or a file in it) must not be trusted, or "" when only its owner
    (this process's user) can write it."""
    info = path.stat()
    if info.st_uid != os.getuid():
        return f"it is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"group or others can write it (mode {stat.S_IMODE(info.st_mode):#o})"
    return ""


def private_directory(path: Path) -> Path:
    """``path``, created owner-only (0o700) when missing. Raises :class:`UnsafeCacheError` when it exists
    but someone else can write it (:func:`unsafe_reason`)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    reason = unsafe_reason(path)
    if reason:
        raise UnsafeCacheError(f"{path}: {reason}")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_file(lib: Path) -> Path:
    """Where the SHA-256 of ``lib`` is recorded: beside it, ``<name>.sha256``."""
    return lib.with_name(lib.name + ".sha256")


def record_hash(lib: Path) -> None:
    """Write the SHA-256 of ``lib`` beside it (atomically: a temporary file, then a rename)."""
    tmp = hash_file(lib).with_name(f".{hash_file(lib).name}.{os.getpid()}.tmp")
    tmp.write_text(f"{sha256_of(lib)}  {lib.name}\n")
    os.replace(tmp, hash_file(lib))


NOT_BUILT, NO_HASH = "not built", "no recorded SHA-256"  # nothing suspicious: (re)built without a warning


def mismatch(lib: Path) -> str:
    """Why ``lib`` must not be loaded (missing, unsafe, no recorded SHA-256, a different SHA-256), or ""."""
    if not lib.is_file():
        return NOT_BUILT
    reason = unsafe_reason(lib)
    if reason:
        return reason
    try:
        recorded = hash_file(lib).read_text().split()[0]
    except (OSError, IndexError):
        return NO_HASH
    actual = sha256_of(lib)
    return "" if actual == recorded else f"its SHA-256 {actual[:12]}... is not the recorded {recorded[:12]}..."


@contextlib.contextmanager
def _locked(lock: Path):
    """An exclusive lock on ``lock`` (created owner-only): one process checks, builds and loads at a time.
    In a read-only cache there is no lock, and nothing to build either."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _build(compiler: str, target: Path) -> None:
    """Compile and link into ``target`` atomically (a temporary file, then a rename), so that two
    processes building at once never load a half-written library, and record its SHA-256. OpenMP and
    libmvec (glibc's vector maths) when the toolchain has them."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "scan.o", Path(tmp) / target.name
        last_error = ""
        for openmp, libs in ((["-fopenmp"], ["-lmvec", "-lm"]), ([], ["-lmvec", "-lm"]), ([], ["-lm"])):
            for cmd in ([compiler, *COMPILE_FLAGS, *openmp, "-c", str(SOURCE), "-o", str(obj)],
                        [compiler, "-shared", *openmp, str(obj), "-o", str(lib), *libs]):
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                if done.returncode:
                    last_error = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
                    break
            else:
                lib.chmod(0o755)  # whatever the umask: only the owner may write what every run executes
                os.replace(lib, target)
                record_hash(target)
                return
        raise RuntimeError(f"{compiler} failed: {last_error}")


def _load_verified(compiler: str, target: Path):
    """``target`` loaded with ctypes once its SHA-256 matches the recorded one; built (or rebuilt, with
    one warning when it was there but did not match) first."""
    with _locked(target.with_name(target.name + ".lock")):
        problem = mismatch(target)
        if problem:
            if problem not in (NOT_BUILT, NO_HASH):
                warnings.warn(f"mamba: {target} is not loaded ({problem}); rebuilding it")
            _build(compiler, target)
            problem = mismatch(target)
            if problem:  # changed between the build and the check: refuse rather than load it
                raise RuntimeError(f"{target} changed right after it was built ({problem})")
        return ctypes.CDLL(str(target))


def cache_directory() -> Path:
    return Path(os.environ.get("TREAD_BENCH_CACHE") or Path.home() / ".cache" / "tread-bench")


@functools.lru_cache(maxsize=None)
def load():
    """The ctypes library, or None (``TREAD_CPU_SCAN=0``, no compiler, or a failed build). Built once
    per machine, loaded once per process, from a private cache and only when its SHA-256 matches."""
    if os.environ.get("TREAD_CPU_SCAN", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        warnings.warn("mamba: no C++ compiler found (set CXX); the CPU scan runs in pure PyTorch, several times slower")
        return None
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(COMPILE_FLAGS), compiler,
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    name = f"mamba_cpu_scan-{key}.so"
    cache = cache_directory()
    try:
        try:
            lib = _load_verified(compiler, private_directory(cache) / name)
        except UnsafeCacheError as err:
            warnings.warn(f"mamba: the CPU scan cache is not used ({err}): anyone who can write it could run code "
                          f"in every Mamba run; remove it or set TREAD_BENCH_CACHE to a directory only you can "
                          f"write. Built in a private temporary directory for this process instead")
            with tempfile.TemporaryDirectory(prefix="tread-bench-") as fresh:  # 0o700, removed once loaded
                lib = _load_verified(compiler, Path(fresh) / name)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:  # no compiler, read-only cache, ...
        warnings.warn(f"mamba: the fused CPU scan did not build ({err}); the CPU scan runs in pure PyTorch, "
                      "several times slower")
        return None
    scan_args = [_LONG] * 8 + [_POINTER] * 6 + [_INT]
    for suffix in ("f32", "f64"):
        getattr(lib, f"scan_forward_{suffix}").argtypes = scan_args
        getattr(lib, f"scan_backward_{suffix}").argtypes = scan_args[:-2] + [_POINTER] * 6 + [_INT]
        getattr(lib, f"softplus_{suffix}").argtypes = [_LONG, _POINTER, _POINTER]
        getattr(lib, f"softplus_{suffix}").restype = None
    return lib


def _kernel(lib, name: str, like: torch.Tensor):
    return getattr(lib, f"{name}_{'f64' if like.dtype == torch.float64 else 'f32'}")


def _shapes(u: torch.Tensor, B: torch.Tensor) -> list:
    """(L, Bt, D, N) and the time and batch strides of the (Bt, L, D) and (Bt, L, N) tensors."""
    batch, length, channels = u.shape
    return [length, batch, channels, B.shape[-1], u.stride(1), u.stride(0), B.stride(1), B.stride(0)]


def _scan(fn, *args) -> None:
    if fn(*args, torch.get_num_threads()):
        raise MemoryError("mamba: the fused CPU scan could not allocate its scratch buffers")


class FusedCPUScan(torch.autograd.Function):
    """The selective scan of ``backbones.mamba._SelectiveScan`` on the C++ kernels, batch first:
    u, delta, z (Bt, L, D) and B, C (Bt, L, N), contiguous; A (D, N);
    D, delta_bias (D,). Returns (y + D u) silu(z), (Bt, L, D). Saves only O(Bt L D) tensors; the
    kernels recompute the states in backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        if not all(t.is_contiguous() for t in (u, delta, B, C, z)):  # the kernels index them by shape
            raise ValueError("FusedCPUScan needs contiguous u, delta, B, C, z; backbones.mamba.selective_scan makes them so")
        lib = load()
        raw = delta + delta_bias
        if softplus:
            dt = torch.empty_like(raw)
            _kernel(lib, "softplus", raw)(raw.numel(), raw.data_ptr(), dt.data_ptr())
        else:
            dt = raw
        dt_u, At = dt * u, A.t().contiguous()
        y = torch.empty_like(u)
        _scan(_kernel(lib, "scan_forward", u), *_shapes(u, B), dt.data_ptr(), dt_u.data_ptr(), B.data_ptr(),
              C.data_ptr(), At.data_ptr(), y.data_ptr())
        y.addcmul_(u, D)  # the output before the gate, y + D u
        ctx.save_for_backward(u, raw if softplus else None, dt, A, B, C, D, z, y)
        ctx.softplus = softplus
        return y * F.silu(z)

    @staticmethod
    def backward(ctx, grad_out):
        u, raw, dt, A, B, C, D, z, y = ctx.saved_tensors
        lib = load()
        dt_u, At = dt * u, A.t().contiguous()
        grad_y = torch.empty_like(u)
        torch.mul(grad_out, F.silu(z), out=grad_y)  # u's strides, whatever grad_out's are
        grad_dt_u, grad_dt = torch.empty_like(u), torch.empty_like(u)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_At = u.new_empty((u.shape[0],) + At.shape)  # one partial per batch row
        _scan(_kernel(lib, "scan_backward", u), *_shapes(u, B), dt.data_ptr(), dt_u.data_ptr(), B.data_ptr(),
              C.data_ptr(), At.data_ptr(), grad_y.data_ptr(), grad_dt_u.data_ptr(), grad_dt.data_ptr(),
              grad_B.data_ptr(), grad_C.data_ptr(), grad_At.data_ptr())
        grad_dt.addcmul_(u, grad_dt_u)
        grad_u = torch.mul(grad_y, D).addcmul_(dt, grad_dt_u)
        grad_D = (grad_y * u).sum((0, 1))
        grad_z = torch.ops.aten.silu_backward(grad_out * y, z)
        grad_delta = torch.ops.aten.softplus_backward(grad_dt, raw, 1.0, 20.0) if ctx.softplus else grad_dt
        return grad_u, grad_delta, grad_At.sum(0).t(), grad_B, grad_C, grad_D, grad_z, grad_delta.sum((0, 1)), None
