"""Mamba backbone: adaLN-Zero blocks around a bidirectional selective scan over the token grid.

DiS-style token mixing (Fei et al. 2024): every block scans the token sequence in raster order
forwards and backwards with two Mamba mixers and sums them; conditioning is DiT's adaLN-Zero
(shift/scale/gate from the timestep+class vector), as ZigMa does.

The mixer has exactly ``mamba_ssm.Mamba``'s parameters (names, shapes, init), so one checkpoint
runs on two paths: the fused CUDA kernels of ``mamba_ssm`` / ``causal_conv1d`` when they import
and the tensor is on CUDA, otherwise a pure-PyTorch path (depthwise conv + chunked parallel scan)
that also runs on CPU. ``mamba_ssm`` is imported lazily: it fails to import on CPU machines.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn
from torch.nn import functional as F

from .layers import ConditionedPatchStack, modulate
from .protocol import BlockStack
from .registry import ConfigError, register_backbone


@functools.lru_cache(maxsize=None)
def fused_kernels():
    """(selective_scan_fn, causal_conv1d_fn) from mamba_ssm / causal_conv1d, or None when either
    does not import (CPU machines, missing CUDA libraries). Asked only for CUDA tensors."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or an OSError/RuntimeError from a CUDA extension that fails to load
        return None
    return selective_scan_fn, causal_conv1d_fn


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


def _step_sizes(delta: torch.Tensor, delta_bias: torch.Tensor, softplus: bool) -> torch.Tensor:
    raw = delta + delta_bias
    return F.softplus(raw) if softplus else raw


def _decays(dt: torch.Tensor, A: torch.Tensor, extra_step: bool = False) -> torch.Tensor:
    """exp(dt A), (L, B, D, N). With ``extra_step`` one zero step is appended, so that
    ``out[1:]`` is the decay of the next step (what the backward recurrence multiplies by)."""
    length = dt.shape[0]
    out = dt.new_empty((length + int(extra_step),) + dt.shape[1:] + A.shape[-1:])
    torch.mul(dt.unsqueeze(-1), A, out=out[:length]).exp_()
    if extra_step:
        out[length:].zero_()
    return out


def _states(a: torch.Tensor, dt: torch.Tensor, u: torch.Tensor, B: torch.Tensor,
            start: torch.Tensor | None = None, with_start: bool = False) -> torch.Tensor:
    """h[t] = a[t] h[t-1] + dt[t] u[t] B[t], (L, B, D, N), from h[-1] = ``start`` (zero if None);
    ``with_start`` prepends h[-1] as row 0."""
    length = dt.shape[0]
    out = dt.new_empty((length + int(with_start),) + dt.shape[1:] + B.shape[-1:])
    h = out[int(with_start):]
    torch.mul((dt * u).unsqueeze(-1), B.unsqueeze(2), out=h)
    if start is not None:
        h[0].addcmul_(a[0], start)  # the incoming state enters through the first step's input
    _linear_scan_(a[:length], h)
    if with_start:
        out[0] = 0 if start is None else start
    return out


def _readout(h: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """y[t, b, d] = sum_n h[t, b, d, n] C[t, b, n]. Products and sums, not matmul/einsum: these
    contractions over 16 states are matrix-vector products that CPU BLAS runs several times slower."""
    return (h * C.unsqueeze(2)).sum(-1)


# CPU tiling of the (L, B, D_inner, N) work: tiles of at most _TIME_BLOCK steps and about
# _SLAB_ELEMENTS elements (4 MB), so the working tensors stay in cache and the allocator reuses
# them (fresh 50 MB buffers cost more in page faults than the arithmetic), and the cost stays
# linear in L. The state is carried from one time block to the next.
_SLAB_ELEMENTS = 1 << 20
_TIME_BLOCK = 256


def _tiles(dt: torch.Tensor, d_state: int):
    """(channel slices, time slices) of the work; on GPUs one tile, to keep kernel launches few."""
    length, batch, channels = dt.shape
    if dt.device.type != "cpu":
        return [slice(0, channels)], [slice(0, length)]
    block = min(length, _TIME_BLOCK)
    per_slab = max(1, _SLAB_ELEMENTS // (block * batch * d_state))
    return ([slice(c, min(c + per_slab, channels)) for c in range(0, channels, per_slab)],
            [slice(t, min(t + block, length)) for t in range(0, length, block)])


class _SelectiveScan(torch.autograd.Function):
    """Selective scan on time-first tensors: u, delta, z (L, B, D); B, C (L, B, N); A (D, N); D,
    delta_bias (D,). Saves its inputs and the state entering each time block, and recomputes the
    (L, B, D, N) states in backward, as the CUDA kernel does: training memory stays O(L D)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        dt = _step_sizes(delta, delta_bias, softplus)
        channels, times = _tiles(dt, A.shape[-1])
        y = torch.empty_like(u)
        block_starts = u.new_zeros((len(times),) + u.shape[1:] + A.shape[-1:])  # state entering block k
        for cs in channels:
            for k, ts in enumerate(times):
                start = block_starts[k, :, cs] if k else None
                h = _states(_decays(dt[ts, :, cs], A[cs]), dt[ts, :, cs], u[ts, :, cs], B[ts], start)
                y[ts, :, cs] = _readout(h, C[ts])
                if k + 1 < len(times):
                    block_starts[k + 1, :, cs] = h[-1]
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, block_starts)
        ctx.softplus = softplus
        return (y + u * D) * F.silu(z)

    @staticmethod
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, z, delta_bias, block_starts = ctx.saved_tensors
        dt = _step_sizes(delta, delta_bias, ctx.softplus)
        gate = torch.sigmoid(z)
        grad_y = grad_out * z * gate
        y, grad_u, grad_dt, grad_A = torch.empty_like(u), torch.empty_like(u), torch.empty_like(dt), torch.zeros_like(A)
        grad_B, grad_C = torch.zeros_like(B), torch.zeros_like(C)
        channels, times = _tiles(dt, A.shape[-1])
        for cs in channels:
            carry = None  # a[t+1] dL/dh[t+1] for the first step t+1 of the block after this one
            for k in reversed(range(len(times))):
                ts = times[k]
                dt_s, u_s, grad_y_s = dt[ts, :, cs], u[ts, :, cs], grad_y[ts, :, cs]
                decays = _decays(dt_s, A[cs], extra_step=True)  # decays[t] = a[t], decays[-1] = 0
                states = _states(decays, dt_s, u_s, B[ts], block_starts[k, :, cs], with_start=True)
                a, h, h_prev = decays[:-1], states[1:], states[:-1]  # h_prev[t] = h[t-1]
                y[ts, :, cs] = _readout(h, C[ts])
                grad_C[ts] += (h * grad_y_s.unsqueeze(-1)).sum(2)
                # dL/dh[t] = grad_y[t] C[t] + a[t+1] dL/dh[t+1]: the same scan run backwards.
                grad_h = grad_y_s.unsqueeze(-1) * C[ts].unsqueeze(2)
                if carry is not None:
                    grad_h[-1] += carry
                _linear_scan_(decays[1:], grad_h, reverse=True)
                carry = a[0] * grad_h[0]
                # a[t] = exp(dt[t] A): dL/d(dt A)[t] = dL/dh[t] h[t-1] a[t], built in the decays' buffer.
                grad_log_decay = a.mul_(h_prev).mul_(grad_h)
                grad_A[cs] += (grad_log_decay * dt_s.unsqueeze(-1)).sum((0, 1))
                grad_h_B = _readout(grad_h, B[ts])  # input term dt[t] u[t] B[t]
                grad_dt[ts, :, cs] = (grad_log_decay * A[cs]).sum(-1) + u_s * grad_h_B
                grad_u[ts, :, cs] = dt_s * grad_h_B
                grad_B[ts] += (grad_h * (dt_s * u_s).unsqueeze(-1)).sum(2)
        grad_u += grad_y * D
        grad_D = (grad_y * u).sum((0, 1))
        grad_z = grad_out * (y + u * D) * gate * (1 + z * (1 - gate))
        grad_delta = grad_dt * torch.sigmoid(delta + delta_bias) if ctx.softplus else grad_dt
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_delta.sum((0, 1)), None


@torch.compiler.disable  # torch.compile would unroll the Python loops over steps; run it eagerly
def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """Pure-PyTorch ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (same layout:
    u, delta, z (B, D, L); B, C (B, N, L); A (D, N); D, delta_bias (D,); returns (B, D, L)).

    out = (y + D u) silu(z), y[t] = C[t] . h[t], h[t] = exp(dt[t] A) h[t-1] + dt[t] B[t] u[t],
    dt = softplus(delta + delta_bias). D, z and delta_bias are required (mamba_ssm allows None).
    Runs in float32 (or float64 for float64 inputs) with autocast off; returns u's dtype.
    """
    dtype = torch.promote_types(u.dtype, torch.float32)
    # autocast off (only where autocast exists: FLOP counting runs this on the meta device)
    no_autocast = (torch.autocast(device_type=u.device.type, enabled=False)
                   if u.device.type in ("cpu", "cuda", "xpu") else contextlib.nullcontext())
    with no_autocast:
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
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        # mamba_ssm's dt init: weight ~ U(+-rank^-0.5); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max].
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

    def scan_macs(self, x: torch.Tensor) -> int:
        """Multiply-adds of the selective scan for input x (B, L, d_model): the common estimate
        9 B L D_inner N (one direction), which FLOP counters cannot see inside the kernel."""
        return 9 * x.shape[0] * x.shape[1] * self.d_inner * self.d_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_kernels() if (self.use_fused_kernels and x.is_cuda) else None
        u, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, D_inner, L) each
        if fused is not None:
            u = fused[1](u.contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        else:
            u = F.silu(causal_depthwise_conv1d(u, self.conv1d.weight, self.conv1d.bias))
        dt, B, C = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias added inside the scan
        scan = fused[0] if fused is not None else selective_scan
        y = scan(u, delta, -torch.exp(self.A_log.float()), B.transpose(1, 2).contiguous(),
                 C.transpose(1, 2).contiguous(), self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
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

    def forward(self, x, c, grid=None):
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
    # CPU-test size: 6 blocks of width 64 over an 8x8 token grid (32x32 input, patch 4).
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
