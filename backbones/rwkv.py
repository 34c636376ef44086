"""Diffusion-RWKV (Fei et al. 2024, after Vision-RWKV): Bi-RWKV blocks with adaLN-Zero conditioning.

Each block is a spatial mix (q-shift, bidirectional WKV) and a channel mix, each in a DiT-style adaLN-Zero branch.
Bi-WKV, per channel over T tokens in raster order, with w = decay / T and u = first / T, T being the number of
tokens the block is handed (also inside a route)::

    y_t = [sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t] / [same sums with v = 1]

Details: docs/internals.md#backbonesrwkvpy
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from tread_bench.core.errors import ConfigError

from .layers import ConditionedPatchStack, modulate
from .protocol import BlockStack
from .registry import register_backbone

#: multiply-adds of one Bi-WKV call per token and channel (the common estimate; README, Measurement conventions).
WKV_MACS_PER_TOKEN_CHANNEL = 29


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional WKV in O(T): w, u of shape (C,) (already divided by T), k, v of shape (B, T, C).

    Computes in float32 (float64 stays float64) and returns the dtype of ``v``. Positions are
    centred and, for negative decays, offset, so the exponents of the distance factors stay
    within [-|decay|, |decay| / 2]; k is shifted by its per-channel maximum. Both shifts cancel in
    the ratio. Float32 stays finite and accurate for |decay| up to ~80 (the fancy init spans -5..3;
    tested to 100 with moderate keys); only terms negligible next to the dominant ones underflow.
    """
    if k.ndim != 3 or k.shape != v.shape or w.shape != (k.shape[-1],) or u.shape != w.shape:
        raise ValueError(f"bi_wkv expects k, v (B, T, C) and w, u (C,); got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(w.shape)}, {tuple(u.shape)}")
    out_dtype = v.dtype
    dtype = torch.promote_types(k.dtype, torch.float32)
    w, u, k, v = (t.to(dtype) for t in (w, u, k, v))
    seq = k.shape[1]
    pos = torch.arange(seq, device=k.device, dtype=dtype) - (seq - 1) / 2
    pw = pos[:, None] * w  # (T, C): p_t w
    k = k - k.amax(dim=1, keepdim=True).detach()
    # Inclusive sums G[t] = sum_{i<=t} e^{-(t-i) w + k_i} (v_i | 1) = e^{-p_t w} cumsum_i(e^{p_i w + k_i} ...)
    # and H[t] = sum_{i>=t} e^{-(i-t) w + k_i} (v_i | 1) = e^{p_t w} revcumsum_i(e^{-p_i w + k_i} ...).
    # The i != t part of y_t is G[t-1] + H[t+1]: distances |t-i| - 1 with no separate e^{w} factor.
    # The reverse cumsum flips rather than subtracting a prefix from the total (that would cancel).
    # A negative w makes weights grow with distance, up to e^{(T-2)|w|}: scale num and den alike by
    # e^{-(T-1)|w|} (half on each factor) so every exponent stays within [-|decay|, 0].
    half = (torch.relu(-w) * (seq - 1) / 2).detach()
    e_fwd, e_bwd = torch.exp(pw - half + k), torch.exp(k - pw - half)
    to_t_fwd, to_t_bwd = torch.exp(-pw - half), torch.exp(pw - half)
    g_num, g_den = to_t_fwd * (e_fwd * v).cumsum(1), to_t_fwd * e_fwd.cumsum(1)
    h_num = to_t_bwd * (e_bwd * v).flip(1).cumsum(1).flip(1)
    h_den = to_t_bwd * e_bwd.flip(1).cumsum(1).flip(1)
    diag = torch.exp(u - 2 * half + k)
    num = _neighbour_sum(g_num, h_num) + diag * v
    den = _neighbour_sum(g_den, h_den) + diag
    return (num / den).to(out_dtype)


def _neighbour_sum(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """out[:, t] = before[:, t-1] + after[:, t+1], zero past either end of the sequence."""
    return F.pad(before[:, :-1], (0, 0, 1, 0)) + F.pad(after[:, 1:], (0, 0, 0, 1))


def bi_wkv_quadratic(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """O(T^2) reference: a per-channel softmax over logits -(|t-i|-1) w + k_i (i != t), u + k_t (i = t)."""
    seq = k.shape[1]
    idx = torch.arange(seq, device=k.device)
    dist = (idx[:, None] - idx[None, :]).abs().to(k.dtype)  # (T, T)
    logits = -(dist - 1)[None, :, :, None] * w + k[:, None, :, :]  # (B, T, T, C)
    eye = torch.eye(seq, dtype=torch.bool, device=k.device)[None, :, :, None]
    logits = torch.where(eye, (u + k)[:, None, :, :], logits)
    return (torch.softmax(logits, dim=2) * v[:, None, :, :]).sum(dim=2)


def q_shift(x: torch.Tensor, grid: Optional[Tuple[int, int]]) -> torch.Tensor:
    """Channel quarters taken from the left/right/up/down neighbour (zero outside the grid).

    x: (B, T, C) in raster order of ``grid`` = (rows, cols); channels past 4 * (C // 4) are unshifted.
    With ``grid=None`` the shift is 1-D: left and up quarters from the previous token, right and
    down quarters from the next one (see the module docstring).
    """
    b, seq, c = x.shape
    q = c // 4
    left, right, up, down, rest = x.split([q, q, q, q, c - 4 * q], dim=-1)
    if grid is None:
        from_prev = lambda t: F.pad(t[:, :-1], (0, 0, 1, 0))  # noqa: E731
        from_next = lambda t: F.pad(t[:, 1:], (0, 0, 0, 1))  # noqa: E731
        return torch.cat([from_prev(left), from_next(right), from_prev(up), from_next(down), rest], dim=-1)
    rows, cols = grid
    if rows * cols != seq:
        raise ValueError(f"q_shift: grid {grid} does not hold {seq} tokens")
    left, right, up, down = (t.reshape(b, rows, cols, q) for t in (left, right, up, down))
    shifted = [
        F.pad(left[:, :, :-1], (0, 0, 1, 0)),  # value of the left neighbour (col - 1)
        F.pad(right[:, :, 1:], (0, 0, 0, 1)),  # right neighbour (col + 1)
        F.pad(up[:, :-1], (0, 0, 0, 0, 1, 0)),  # neighbour above (row - 1)
        F.pad(down[:, 1:], (0, 0, 0, 0, 0, 1)),  # neighbour below (row + 1)
    ]
    return torch.cat([t.reshape(b, seq, q) for t in shifted] + [rest], dim=-1)


def _fancy_ratios(layer_id: int, depth: int) -> Tuple[float, float]:
    """(l / (L-1), 1 - l / L): 0->1 and 1->~0 across layers, as in RWKV's "fancy init"."""
    return (layer_id / (depth - 1) if depth > 1 else 0.0), 1.0 - layer_id / depth


class BiWKV(nn.Module):
    """Bi-WKV with its per-channel ``decay`` and ``first`` parameters; ``forward(k, v)``.

    Normalises by the T of the call (w = decay / T, u = first / T): see the module docstring.
    ``k`` is the first positional input, so a forward hook can pass ``inputs[0]`` to ``scan_macs``.
    """

    def __init__(self, dim: int, layer_id: int = 0, depth: int = 1):
        super().__init__()
        ratio_0_to_1, _ = _fancy_ratios(layer_id, depth)
        c = torch.arange(dim, dtype=torch.float32)
        # fancy init: decay from -5 (channel 0) to 3 (last channel), more channels local in deeper layers
        self.decay = nn.Parameter(-5 + 8 * (c / max(dim - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1))
        self.first = nn.Parameter(math.log(0.3) + 0.5 * ((c + 1) % 3 - 1))

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        seq = k.shape[1]
        return bi_wkv(self.decay / seq, self.first / seq, k, v)

    def scan_macs(self, k: torch.Tensor) -> int:
        """Multiply-adds of one call on k of shape (B, T, C): 29 * T * C per sample."""
        b, seq, c = k.shape
        return WKV_MACS_PER_TOKEN_CHANNEL * b * seq * c


def _token_mix(x: torch.Tensor, shifted: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """x * mix + shifted * (1 - mix), written out (torch.lerp rejects the mixed dtypes of autocast)."""
    return x * mix + shifted * (1 - mix)


def _mix_ramp(dim: int) -> torch.Tensor:
    return torch.arange(dim, dtype=torch.float32) / dim


class SpatialMix(nn.Module):
    """q-shift, token-shift interpolation, key/value/receptance, Bi-WKV, sigmoid(r) * wkv, output."""

    def __init__(self, dim: int, layer_id: int, depth: int):
        super().__init__()
        ratio_0_to_1, ratio_1_to_0 = _fancy_ratios(layer_id, depth)
        ramp = _mix_ramp(dim)
        self.mix_k = nn.Parameter(ramp ** ratio_1_to_0)
        self.mix_v = nn.Parameter(ramp ** ratio_1_to_0 + 0.3 * ratio_0_to_1)
        self.mix_r = nn.Parameter(ramp ** (0.5 * ratio_1_to_0))
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.wkv = BiWKV(dim, layer_id, depth)
        self.output = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, grid) -> torch.Tensor:
        xx = q_shift(x, grid)
        k = self.key(_token_mix(x, xx, self.mix_k))
        v = self.value(_token_mix(x, xx, self.mix_v))
        r = self.receptance(_token_mix(x, xx, self.mix_r))
        return self.output(torch.sigmoid(r) * self.wkv(k, v))


class ChannelMix(nn.Module):
    """q-shift, token-shift interpolation, squared-ReLU key, value, sigmoid receptance gate."""

    def __init__(self, dim: int, layer_id: int, depth: int, hidden_rate: int = 4):
        super().__init__()
        _, ratio_1_to_0 = _fancy_ratios(layer_id, depth)
        ramp = _mix_ramp(dim)
        self.mix_k = nn.Parameter(ramp ** ratio_1_to_0)
        self.mix_r = nn.Parameter(ramp ** ratio_1_to_0)
        self.key = nn.Linear(dim, hidden_rate * dim, bias=False)
        self.value = nn.Linear(hidden_rate * dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, grid) -> torch.Tensor:
        xx = q_shift(x, grid)
        k = torch.relu(self.key(_token_mix(x, xx, self.mix_k))).square()
        return torch.sigmoid(self.receptance(_token_mix(x, xx, self.mix_r))) * self.value(k)


class RWKVBlock(nn.Module):
    """Bi-RWKV block with adaLN-Zero: ``block(x, cond, grid, positions)``."""

    def __init__(self, dim: int, layer_id: int, depth: int, hidden_rate: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.spatial_mix = SpatialMix(dim, layer_id, depth)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.channel_mix = ChannelMix(dim, layer_id, depth, hidden_rate)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, grid=None, positions=None):  # positions unused: q-shift and the scan use grid
        shift_s, scale_s, gate_s, shift_c, scale_c, gate_c = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_s.unsqueeze(1) * self.spatial_mix(modulate(self.norm1(x), shift_s, scale_s), grid)
        return x + gate_c.unsqueeze(1) * self.channel_mix(modulate(self.norm2(x), shift_c, scale_c), grid)


RWKV_SIZES = {
    # DiT depth/width at patch 2 (the TREAD paper trains Diffusion-RWKV in the DiT configuration).
    "S/2": dict(depth=12, hidden_size=384, patch_size=2),
    "B/2": dict(depth=12, hidden_size=768, patch_size=2),
    "L/2": dict(depth=24, hidden_size=1024, patch_size=2),
    "XL/2": dict(depth=28, hidden_size=1152, patch_size=2),
    # CPU-test size: 6 blocks of width 64 over an 8x8 token grid (32x32 input, patch 4).
    "XS/4": dict(depth=12, hidden_size=64, patch_size=4),  # CPU-study size (scale=cpu)
    "tiny": dict(depth=6, hidden_size=64, patch_size=4),
}


@register_backbone("rwkv", sizes=RWKV_SIZES)
class DiffusionRWKV(ConditionedPatchStack, BlockStack):
    scan_mixing = True

    def __init__(self, depth=12, hidden_size=384, patch_size=2, hidden_rate=4,
                 input_size=32, in_channels=4, num_classes=1000):
        super().__init__()
        if hidden_size % 4:
            raise ConfigError(f"rwkv hidden_size {hidden_size} must be divisible by 4 (q-shift quarters, 2-D pos-embed)")
        self._init_io(input_size, patch_size, in_channels, hidden_size, num_classes)
        self.blocks = nn.ModuleList(RWKVBlock(hidden_size, i, depth, hidden_rate) for i in range(depth))
        self._init_dit_weights()  # fancy-init parameters are nn.Parameters, not Linear: untouched

