"""The fused CPU selective scan: ``mamba_cpu_scan.cpp`` built with the system C++ compiler at first use.

Mamba's scan has no CPU kernel in ``mamba_ssm``; run eagerly in PyTorch it costs several times
DiT's time per training FLOP (``benchmarks/bench_step_per_flop.py``). This module compiles the C++
scan once per machine (``$TREAD_BENCH_CACHE``, default ``~/.cache/tread-bench``, keyed by the
source, the flags and the CPU's instruction set), loads it with ctypes and wraps it in an autograd
Function with the pure path's interface. When no compiler is found or the build fails, :func:`load`
returns None, says why once, and ``backbones.mamba`` keeps its pure-PyTorch scan. ``TREAD_CPU_SCAN=0``
switches the kernel off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
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


def _build(compiler: str, target: Path) -> None:
    """Compile and link into ``target`` atomically (a temporary file, then a rename), so that two
    processes building at once never load a half-written library. OpenMP and libmvec (glibc's
    vector maths) when the toolchain has them."""
    target.parent.mkdir(parents=True, exist_ok=True)
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
                os.replace(lib, target)
                return
        raise RuntimeError(f"{compiler} failed: {last_error}")


@functools.lru_cache(maxsize=None)
def load():
    """The ctypes library, or None (``TREAD_CPU_SCAN=0``, no compiler, or a failed build). Built once
    per machine, loaded once per process."""
    if os.environ.get("TREAD_CPU_SCAN", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        warnings.warn("mamba: no C++ compiler found (set CXX); the CPU scan runs in pure PyTorch, several times slower")
        return None
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(COMPILE_FLAGS), compiler,
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TREAD_BENCH_CACHE") or Path.home() / ".cache" / "tread-bench")
    target = cache / f"mamba_cpu_scan-{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
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
