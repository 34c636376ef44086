"""Mamba backbone: adaLN-Zero blocks around a bidirectional selective scan over the token grid.

DiS-style token mixing (Fei et al. 2024): every block scans the token sequence in raster order
forwards and backwards with two Mamba mixers and sums them; conditioning is DiT's adaLN-Zero
(shift/scale/gate from the timestep+class vector), as ZigMa does.

The mixer has exactly ``mamba_ssm.Mamba``'s parameters (names, shapes, init), so one checkpoint
runs on three paths: the fused CUDA kernels of ``mamba_ssm`` / ``causal_conv1d`` when they import
and the tensor is on CUDA; on CPU the fused C++ scan of ``backbones.mamba_cpu`` (built at first
use with the system compiler); otherwise a pure-PyTorch path (depthwise conv + a scan run step by
step on CPU, as a chunked parallel scan elsewhere). ``use_fused_kernels=False`` forces the pure
path. ``mamba_ssm`` is imported lazily: it fails to import on CPU machines. On CUDA the pure path is
several times slower, so it never runs unannounced: :func:`check_cuda_kernels` refuses a suite's CUDA
run without the kernels before training (``suite.allow_slow_scan=true`` turns that into one warning
line), and a CUDA forward outside a suite prints that line once.
"""
from __future__ import annotations

import contextlib
import functools
import math
import sys
import threading

import torch
from torch import nn
from torch.nn import functional as F

from tread_bench.core.errors import ConfigError

from . import mamba_cpu
from .layers import ConditionedPatchStack, modulate
from .protocol import BlockStack
from .registry import register_backbone


@functools.lru_cache(maxsize=None)
def import_fused_kernels() -> tuple:
    """((selective_scan_fn, causal_conv1d_fn), "") from mamba_ssm / causal_conv1d, or (None, why they did
    not import), once per process."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        import selective_scan_cuda  # noqa: F401  (mamba_ssm after 2.3.2 imports without it, then fails in forward)
    except Exception as err:  # ImportError, or an OSError/RuntimeError from a CUDA extension that fails to load
        return None, " ".join(f"{type(err).__name__}: {err}".split())[:200]
    return (selective_scan_fn, causal_conv1d_fn), ""


def fused_kernels():
    """(selective_scan_fn, causal_conv1d_fn) from mamba_ssm / causal_conv1d, or None when either
    does not import (CPU machines, missing CUDA libraries). Asked only for CUDA tensors."""
    return import_fused_kernels()[0]


#: what running Mamba on CUDA without the fused kernels costs: an estimate for the pure-PyTorch chunked scan
#: against mamba_ssm's single kernel, not measured in this project (its machines have no GPU)
SLOW_SCAN_COST = "about 4-5x slower per training step"
#: how to get the kernels; no prebuilt wheel matches torch 2.14, so pip compiles them with nvcc (docs/cluster.md)
KERNELS_INSTALL = ("TREAD_CUDA_EXTRA=1 scripts/setup.sh on the GPU machine, or pip install --no-build-isolation "
                   "-e '.[cuda]' (mamba-ssm>=2.2 and causal-conv1d>=1.4, compiled with nvcc; docs/cluster.md)")


@functools.lru_cache(maxsize=None)  # once per process
def warn_slow_scan() -> None:
    """Print the one line that says Mamba runs on CUDA without its fused kernels."""
    print(f"warning: mamba on CUDA runs the pure-PyTorch scan, {SLOW_SCAN_COST}: the fused kernels of mamba-ssm "
          f"and causal-conv1d do not import ({import_fused_kernels()[1]}); install them with {KERNELS_INSTALL}",
          file=sys.stderr, flush=True)


# The forward's call: under torch.compile (blocks are compiled on CUDA) a graph break, not a traced print.
_warn_slow_scan_eagerly = torch.compiler.disable(warn_slow_scan)


def check_cuda_kernels(model: nn.Module, allow_slow_scan: bool, where: str) -> None:
    """For a model about to run on CUDA: when it holds Mamba mixers meant for the fused kernels and those do
    not import, a ConfigError (one line: what to install, the slowdown, the key that allows it), or with
    ``allow_slow_scan`` the one warning line of :func:`warn_slow_scan`."""
    if not any(isinstance(m, MambaMixer) and m.use_fused_kernels for m in model.modules()):
        return
    kernels, reason = import_fused_kernels()
    if kernels is not None:
        return
    if allow_slow_scan:
        warn_slow_scan()
        return
    raise ConfigError(f"{where}: mamba on CUDA needs the fused kernels of mamba-ssm and causal-conv1d, which do "
                      f"not import here ({reason}); install them with {KERNELS_INSTALL}, or set "
                      f"suite.allow_slow_scan: true (command line: +suite.allow_slow_scan=true) to train on the "
                      f"pure-PyTorch scan, {SLOW_SCAN_COST}")


def causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise conv, x (B, D, L), weight (D, 1, W): pad W-1 on both sides, keep the first L
    outputs, so output t sees inputs t-W+1..t (what causal_conv1d computes)."""
    width, length = weight.shape[-1], x.shape[-1]
    return F.conv1d(x, weight, bias, padding=width - 1, groups=x.shape[1])[..., :length]


# ----------------------------------------------------------------------------------------------
# Chunked parallel scan of h[t] = a[t] * h[t-1] + b[t] (h[-1] = 0), time-first tensors (L, ...).
# The L steps are cut into ~sqrt(L) chunks of ~sqrt(L) steps: a loop over the steps of a chunk,
# vectorised over all chunks, gives each chunk's local end state (one product gives its decay);
# a loop over the chunks carries the true state from chunk to chunk; a second loop over the steps
# writes the states. O(L) work and memory in 2 sqrt(L) vectorised steps plus sqrt(L) small ones,
# and it only multiplies decays (never divides by them), so it is stable for any step size.
# ----------------------------------------------------------------------------------------------

def _linear_scan_(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """In place: b becomes the states h. Forward: h[t] = a[t] h[t-1] + b[t]; reverse:
    h[t] = a[t] h[t+1] + b[t]; zero state before the first step. Returns b."""
    length = b.shape[0]
    chunk = max(1, math.isqrt(length))
    num_chunks = length // chunk
    covered = num_chunks * chunk
    # The chunked part starts where the recurrence starts; the leftover steps run one by one after it.
    region = slice(length - covered, length) if reverse else slice(0, covered)
    leftover = range(length - covered - 1, -1, -1) if reverse else range(covered, length)
    step = -1 if reverse else 1
    ac, bc = a[region].unflatten(0, (num_chunks, chunk)), b[region].unflatten(0, (num_chunks, chunk))
    order = list(range(chunk))[::step]
    # 1) every chunk from a zero state: its end state and the product of its decays.
    local, decay = bc[:, order[0]].clone(), ac.prod(dim=1)
    for t in order[1:]:
        torch.addcmul(bc[:, t], ac[:, t], local, out=local)
    # 2) true state at the end of every chunk, chunk after chunk.
    chunks = list(range(num_chunks))[::step]
    for prev, c in zip(chunks[:-1], chunks[1:]):
        local[c].addcmul_(decay[c], local[prev])
    # 3) the states: each chunk starts from its predecessor's end state.
    if num_chunks > 1:
        later, earlier = (slice(0, -1), slice(1, None)) if reverse else (slice(1, None), slice(0, -1))
        bc[later, order[0]].addcmul_(ac[later, order[0]], local[earlier])
    for prev, t in zip(order[:-1], order[1:]):
        bc[:, t].addcmul_(ac[:, t], bc[:, prev])
    for t in leftover:
        b[t].addcmul_(a[t], b[t - step])
    return b


def _sequential_scan_(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """In place, the same recurrence as :func:`_linear_scan_`, one step at a time: one addcmul per
    step over everything else (batch, states, channels). One pass over memory, the fewest of any
    order; on CPU, where every op runs its elements one core after another anyway, it is the
    fastest as long as a step holds a few thousand elements."""
    length = b.shape[0]
    if reverse:
        for t in range(length - 2, -1, -1):
            b[t].addcmul_(a[t], b[t + 1])
    else:
        for t in range(1, length):
            b[t].addcmul_(a[t], b[t - 1])
    return b


def _scan_(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """The scan this device runs best: step by step on CPU, chunked elsewhere (few kernel launches)."""
    if b.device.type == "cpu":
        return _sequential_scan_(a, b, reverse)
    return _linear_scan_(a, b, reverse)


# Scratch memory for the CPU tiles, reused from tile to tile and call to call (per thread): a fresh
# multi-megabyte buffer is fresh pages from the OS, and the page faults cost as much as the
# arithmetic written into it. Tile tensors built here never leave the scan functions.
_scratch = threading.local()


def _buffer(slot: str, shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` (like's dtype and device), for CPU tiles from a reused
    per-thread buffer ``slot``; elsewhere a fresh one (the CUDA caching allocator reuses memory)."""
    if like.device.type != "cpu" or torch.jit.is_tracing():  # the tracer cannot see older tensors
        return like.new_empty(shape)
    numel, buffers = math.prod(shape), _scratch.__dict__.setdefault("buffers", {})
    key = (slot, like.dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers[key] = buf = like.new_empty(numel)
    return buf[:numel].view(shape)


# The (L, B, D_inner, N) work is laid out (L, B, N, D_inner): channels innermost (contiguous and
# long), so that broadcasts over states and sums over states run vectorised over channels, and the
# contractions with B and C over the 16 states are batched (1 x N) @ (N x D) products.

def _decays(dt: torch.Tensor, At: torch.Tensor, extra_step: bool = False) -> torch.Tensor:
    """exp(dt A), (L, B, N, D) from dt (L, B, D) and At = A^T (N, D). With ``extra_step`` one zero
    step is appended, so that ``out[1:]`` is the decay of the next step (what the backward
    recurrence multiplies by)."""
    length = dt.shape[0]
    out = _buffer("decays", (length + int(extra_step),) + dt.shape[1:2] + At.shape, dt)
    torch.mul(dt.unsqueeze(2), At, out=out[:length]).exp_()
    if extra_step:
        out[length:].zero_()
    return out


def _states(a: torch.Tensor, dt_u: torch.Tensor, B: torch.Tensor,
            start: torch.Tensor | None = None, with_start: bool = False) -> torch.Tensor:
    """h[t] = a[t] h[t-1] + dt[t] u[t] B[t], (L, B, N, D), from h[-1] = ``start`` (zero if None);
    ``dt_u`` (L, B, D), B (L, B, N); ``with_start`` prepends h[-1] as row 0."""
    length = dt_u.shape[0]
    out = _buffer("states", (length + int(with_start),) + B.shape[1:] + dt_u.shape[-1:], dt_u)
    h = out[int(with_start):]
    torch.mul(dt_u.unsqueeze(2), B.unsqueeze(-1), out=h)
    if start is not None:
        h[0].addcmul_(a[0], start)  # the incoming state enters through the first step's input
    _scan_(a[:length], h)
    if with_start:
        out[0] = 0 if start is None else start
    return out


def _contract_states(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out[t, b, d] = sum_n h[t, b, n, d] v[t, b, n]: h (L, B, N, D) contiguous, v (L, B, N)."""
    length, batch, states, channels = h.shape
    return torch.bmm(v.reshape(length * batch, 1, states), h.view(length * batch, states, channels)).view(length, batch, channels)


def _contract_channels(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out[t, b, n] = sum_d h[t, b, n, d] v[t, b, d]: h (L, B, N, D) contiguous, v (L, B, D)."""
    length, batch, states, channels = h.shape
    return torch.bmm(h.view(length * batch, states, channels), v.reshape(length * batch, channels, 1)).view(length, batch, states)


# CPU tiling of the (L, B, N, D_inner) work: blocks of consecutive steps (all of the batch; channel
# slabs only when one step alone exceeds the tile) of about _SLAB_ELEMENTS elements, so that the
# working tensors stay in cache and the allocator reuses them (fresh 50 MB buffers cost more in
# page faults than the arithmetic); the state is carried from one time block to the next.
_SLAB_ELEMENTS = 1 << 20
_TIME_BLOCK = 256


def _tiles(dt: torch.Tensor, d_state: int):
    """(channel slices, time slices) of the work; on GPUs one tile, to keep kernel launches few."""
    length, batch, channels = dt.shape
    if dt.device.type != "cpu":
        return [slice(0, channels)], [slice(0, length)]
    block = max(1, min(length, _TIME_BLOCK, _SLAB_ELEMENTS // (batch * d_state * channels)))
    per_slab = max(1, min(channels, _SLAB_ELEMENTS // (block * batch * d_state)))
    return ([slice(c, min(c + per_slab, channels)) for c in range(0, channels, per_slab)],
            [slice(t, min(t + block, length)) for t in range(0, length, block)])


class _SelectiveScan(torch.autograd.Function):
    """Selective scan on time-first tensors: u, delta, z (L, B, D); B, C (L, B, N); A (D, N); D,
    delta_bias (D,). Saves O(L B D) tensors (inputs, step sizes, the output before the gate) and
    the state entering each time block, and recomputes the (L, B, N, D) states in backward, as the
    CUDA kernel does: training memory stays O(L D)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        raw = delta + delta_bias
        dt = F.softplus(raw) if softplus else raw
        dt_u = dt * u
        At = A.t().contiguous()
        channels, times = _tiles(dt, A.shape[-1])
        y = torch.empty_like(u)
        block_starts = u.new_empty((len(times),) + u.shape[1:2] + A.shape[-1:] + u.shape[2:])  # state entering block k
        block_starts[0] = 0
        for cs in channels:
            for k, ts in enumerate(times):
                start = block_starts[k, :, :, cs] if k else None
                h = _states(_decays(dt[ts, :, cs], At[:, cs]), dt_u[ts, :, cs], B[ts], start)
                y[ts, :, cs] = _contract_states(h, C[ts])
                if k + 1 < len(times):
                    block_starts[k + 1, :, :, cs] = h[-1]
        y.addcmul_(u, D)  # the output before the gate, y + D u
        ctx.save_for_backward(u, raw if softplus else None, dt, A, B, C, D, z, y, block_starts)
        ctx.softplus = softplus
        return y * F.silu(z)

    @staticmethod
    def backward(ctx, grad_out):
        u, raw, dt, A, B, C, D, z, y, block_starts = ctx.saved_tensors
        dt_u = dt * u
        At = A.t().contiguous()
        grad_y = grad_out * F.silu(z)
        grad_h_B, grad_dt = torch.empty_like(u), torch.empty_like(dt)
        grad_At, grad_B, grad_C = torch.zeros_like(At), torch.zeros_like(B), torch.zeros_like(C)
        channels, times = _tiles(dt, A.shape[-1])
        for cs in channels:
            carry = None  # a[t+1] dL/dh[t+1] for the first step t+1 of the block after this one
            for k in reversed(range(len(times))):
                ts = times[k]
                dt_s, grad_y_s = dt[ts, :, cs], grad_y[ts, :, cs]
                decays = _decays(dt_s, At[:, cs], extra_step=True)  # decays[t] = a[t], decays[-1] = 0
                states = _states(decays, dt_u[ts, :, cs], B[ts], block_starts[k, :, :, cs], with_start=True)
                a, h, h_prev = decays[:-1], states[1:], states[:-1]  # h_prev[t] = h[t-1]
                grad_C[ts] += _contract_channels(h, grad_y_s)
                # dL/dh[t] = grad_y[t] C[t] + a[t+1] dL/dh[t+1]: the same scan run backwards.
                grad_h = torch.mul(grad_y_s.unsqueeze(2), C[ts].unsqueeze(-1), out=_buffer("grad_states", h.shape, h))
                if carry is not None:
                    grad_h[-1] += carry
                _scan_(decays[1:], grad_h, reverse=True)
                carry = a[0] * grad_h[0]
                grad_h_B[ts, :, cs] = _contract_states(grad_h, B[ts])  # input term dt[t] u[t] B[t]
                grad_B[ts] += _contract_channels(grad_h, dt_u[ts, :, cs])
                # a[t] = exp(dt[t] A): dL/d(dt A)[t] = dL/dh[t] h[t-1] a[t], built in the decays' buffer.
                grad_log_decay = a.mul_(h_prev).mul_(grad_h)
                grad_At[:, cs] += torch.mul(grad_log_decay, dt_s.unsqueeze(2), out=h).sum((0, 1))
                grad_dt[ts, :, cs] = grad_log_decay.mul_(At[:, cs]).sum(2)
        grad_dt.addcmul_(u, grad_h_B)
        grad_u = torch.mul(grad_y, D).addcmul_(dt, grad_h_B)
        grad_D = (grad_y * u).sum((0, 1))
        grad_z = torch.ops.aten.silu_backward(grad_out * y, z)
        grad_delta = torch.ops.aten.softplus_backward(grad_dt, raw, 1.0, 20.0) if ctx.softplus else grad_dt
        return grad_u, grad_delta, grad_At.t(), grad_B, grad_C, grad_D, grad_z, grad_delta.sum((0, 1)), None


@torch.compiler.disable  # torch.compile would unroll the Python loops over steps; run it eagerly
def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, cpu_kernel=True):
    """``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` without CUDA (same layout:
    u, delta, z (B, D, L); B, C (B, N, L); A (D, N); D, delta_bias (D,); returns (B, D, L)).
    On CPU tensors it runs the fused C++ scan of ``backbones.mamba_cpu`` when ``cpu_kernel`` and
    that kernel builds; otherwise (other devices, the meta device, tracing) the pure-PyTorch scan.

    out = (y + D u) silu(z), y[t] = C[t] . h[t], h[t] = exp(dt[t] A) h[t-1] + dt[t] B[t] u[t],
    dt = softplus(delta + delta_bias). D, z and delta_bias are required (mamba_ssm allows None).
    Runs in float32 (or float64 for float64 inputs) with autocast off; returns u's dtype.
    """
    dtype = torch.promote_types(u.dtype, torch.float32)
    # autocast off (only where autocast exists: FLOP counting runs this on the meta device)
    no_autocast = (torch.autocast(device_type=u.device.type, enabled=False)
                   if u.device.type in ("cpu", "cuda", "xpu") else contextlib.nullcontext())
    with no_autocast:
        if (cpu_kernel and u.device.type == "cpu" and not torch.jit.is_tracing()
                and mamba_cpu.load() is not None):
            def batch_first(t):  # (B, *, L) -> (B, L, *), no copy when it is a transposed (B, L, *) tensor
                return t.transpose(1, 2).to(dtype).contiguous()

            out = mamba_cpu.FusedCPUScan.apply(batch_first(u), batch_first(delta), A.to(dtype), batch_first(B),
                                               batch_first(C), D.to(dtype), batch_first(z), delta_bias.to(dtype),
                                               delta_softplus)
            return out.transpose(1, 2).to(u.dtype)

        def time_first(t):
            return t.permute(2, 0, 1).to(dtype).contiguous()

        out = _SelectiveScan.apply(time_first(u), time_first(delta), A.to(dtype), time_first(B), time_first(C),
                                   D.to(dtype), time_first(z), delta_bias.to(dtype), delta_softplus)
    return out.permute(1, 2, 0).to(u.dtype)


class MambaMixer(nn.Module):
    """One Mamba (S6) mixer over (B, L, d_model), causal in L; parameters named and initialised as
    ``mamba_ssm.Mamba(d_model)``: in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 use_fused_kernels: bool = True):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.use_fused_kernels = use_fused_kernels
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.A_log.no_weight_decay = True  # AdamW leaves them undecayed (backbones.protocol.weight_decay_groups)
        self.D.no_weight_decay = True
        # mamba_ssm's dt init: weight ~ U(+-rank^-0.5); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max].
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def scan_macs(self, x: torch.Tensor) -> int:
        """Multiply-adds of the selective scan for input x (B, L, d_model): the common estimate
        9 B L D_inner N (one direction), which FLOP counters cannot see inside the kernel."""
        return 9 * x.shape[0] * x.shape[1] * self.d_inner * self.d_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_kernels() if (self.use_fused_kernels and x.is_cuda) else None
        if fused is None and self.use_fused_kernels and x.is_cuda:
            _warn_slow_scan_eagerly()  # never silently: suites refuse or warn before training, other callers here
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, D_inner) each
        if fused is not None:
            u = fused[1](u.transpose(1, 2).contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                         activation="silu").transpose(1, 2)
        else:
            # a contiguous (B, D_inner, L) input: oneDNN's depthwise conv is slow on the strided view
            u = F.silu(causal_depthwise_conv1d(u.transpose(1, 2).contiguous(), self.conv1d.weight,
                                               self.conv1d.bias)).transpose(1, 2)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)  # bias added inside the scan
        # The scans take mamba_ssm's (B, D, L) layout: transposed views here, so the CPU kernel, which
        # works batch first, copies nothing.
        scan = fused[0] if fused is not None else functools.partial(selective_scan, cpu_kernel=self.use_fused_kernels)
        y = scan(u.transpose(1, 2), delta.transpose(1, 2), -torch.exp(self.A_log.float()), B.transpose(1, 2),
                 C.transpose(1, 2), self.D.float(), z=z.transpose(1, 2), delta_bias=self.dt_proj.bias.float(),
                 delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))


class BidirectionalMambaBlock(nn.Module):
    """x + gate * (mixer_fwd(h) + flip(mixer_bwd(flip(h)))), h = modulate(LayerNorm(x), shift, scale).

    The scans run over the tokens in the order given: raster order of the full grid, or of the
    kept rows when a route selects whole rows. ``grid`` is therefore not needed.
    """

    def __init__(self, hidden_size: int, **mixer_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.forward_mixer = MambaMixer(hidden_size, **mixer_kwargs)
        self.backward_mixer = MambaMixer(hidden_size, **mixer_kwargs)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # adaLN-Zero: the block starts as identity
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x, c, grid=None, positions=None):
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        h = modulate(self.norm(x), shift, scale)
        mixed = self.forward_mixer(h) + self.backward_mixer(h.flip(1)).flip(1)
        return x + gate.unsqueeze(1) * mixed


def _mamba_sizes():
    # DiT-like width/depth. Two mixers per block (no MLP): ~15 width^2 parameters per block, so
    # B/2 (12 x 768) has ~115M parameters, the closest DiT size to the paper's 111M Mamba.
    widths = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "XL": (28, 1152)}
    sizes = {f"{name}/{p}": dict(depth=d, hidden_size=w, patch_size=p)
             for name, (d, w) in widths.items() for p in (2, 4, 8)}
    # Width 64 over an 8x8 token grid (32x32 input, patch 4): 12 blocks for the CPU study (scale=cpu),
    # 6 for the tests (scale=tiny).
    sizes["XS/4"] = dict(depth=12, hidden_size=64, patch_size=4)
    sizes["tiny"] = dict(depth=6, hidden_size=64, patch_size=4)
    return sizes


MAMBA_SIZES = _mamba_sizes()


@register_backbone("mamba", sizes=MAMBA_SIZES)
class DiffusionMamba(ConditionedPatchStack, BlockStack):
    scan_mixing = True

    def __init__(self, depth=12, hidden_size=768, patch_size=2, d_state=16, d_conv=4, expand=2,
                 use_fused_kernels=True, input_size=32, in_channels=4, num_classes=1000):
        super().__init__()
        if depth < 1 or hidden_size < 1:
            raise ConfigError(f"mamba needs depth >= 1 and hidden_size >= 1, got depth={depth}, hidden_size={hidden_size}")
        self._init_io(input_size, patch_size, in_channels, hidden_size, num_classes)
        self.blocks = nn.ModuleList(
            BidirectionalMambaBlock(hidden_size, d_state=d_state, d_conv=d_conv, expand=expand,
                                    use_fused_kernels=use_fused_kernels)
            for _ in range(depth)
        )
        # The mixers keep mamba_ssm's own init; the conditioning layers get DiT's xavier init.
        for module in (self.t_embedder, self.final_layer):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)
        self._init_io_weights()
