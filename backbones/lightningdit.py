"""LightningDiT-style transformer (Yao et al. 2025, "Reconstruction vs. Generation", hustvl/LightningDiT).

DiT's adaLN-Zero block with LightningDiT's parts: 2-D axial RoPE on queries and keys (EVA-02 layout), RMSNorm,
QK-norm (on by default), SwiGLU of hidden width ``int(2/3 * mlp_ratio * dim)``; DiT's sin-cos embedding is kept.
Routed blocks rotate each token by its true position: one cos/sin table for the full grid, gathered per sample by
``positions``. ``scan_mixing`` is False, so routes use random selection.
Details: docs/internals.md#backboneslightningditpy
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from timm.layers import RmsNorm, SwiGLU, apply_rot_embed
from torch import nn
from torch.nn import functional as F

from .dit import DIT_SIZES
from .layers import ConditionedPatchStack, modulate
from .protocol import BlockStack
from .registry import register_backbone


class RMSNorm(RmsNorm):
    """timm's RmsNorm (learnable scale, eps 1e-6) computed in at least float32, like LightningDiT's
    (which normalises ``x.float()``); unlike timm's RmsNormFp32 it leaves float64 in float64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x.dtype in (torch.float16, torch.bfloat16)
        return super().forward(x.float() if low else x).to(x.dtype)


def axial_rope_angles(head_dim: int, grid: Tuple[int, int], theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of 2-D axial RoPE for every token of a (rows, cols) grid, raster order:
    shape (rows*cols, head_dim). Channels [0, head_dim/2) follow the row, the rest the column;
    each frequency is repeated for the two channels of its (interleaved) pair."""
    if head_dim % 4:
        raise ValueError(f"head dim {head_dim} must be divisible by 4 for 2-D axial RoPE")
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (head_dim / 4,)
    rows, cols = grid
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    by_row = (r.reshape(-1, 1) * freqs).repeat_interleave(2, dim=-1)
    by_col = (c.reshape(-1, 1) * freqs).repeat_interleave(2, dim=-1)
    return torch.cat([by_row, by_col], dim=-1)


class AxialRoPE2d(nn.Module):
    """The cos/sin table of 2-D axial RoPE over the full token grid, gathered by token positions."""

    def __init__(self, head_dim: int, grid: Tuple[int, int], theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.grid, self.theta = head_dim, tuple(grid), theta
        angles = axial_rope_angles(head_dim, grid, theta)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, grid={self.grid}, theta={self.theta}"

    def forward(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, n) indices into the raster grid -> (sin, cos), each (B, 1, n, head_dim) (broadcast over heads)."""
        return self.sin[positions].unsqueeze(1), self.cos[positions].unsqueeze(1)


class RoPEAttention(nn.Module):
    """Multi-head self-attention with QK-norm and 2-D RoPE, on PyTorch's scaled-dot-product kernel."""

    def __init__(self, dim: int, num_heads: int, rope: AxialRoPE2d, qk_norm: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        if rope.head_dim != self.head_dim:
            raise ValueError(f"RoPE table is for head dim {rope.head_dim}, attention has {self.head_dim}")
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope  # one table shared by every block of the backbone

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        sin, cos = self.rope(positions)
        q, k = apply_rot_embed(q, sin, cos), apply_rot_embed(k, sin, cos)  # interleaved pairs
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class LightningDiTBlock(nn.Module):
    """``block(x, cond, grid, positions)``: RMSNorm -> RoPE attention and RMSNorm -> SwiGLU, adaLN-Zero."""

    def __init__(self, hidden_size: int, num_heads: int, rope: AxialRoPE2d, mlp_ratio: float = 4.0,
                 qk_norm: bool = True):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = RoPEAttention(hidden_size, num_heads, rope, qk_norm)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * mlp_ratio * hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # adaLN-Zero: the block starts as identity
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x, c, grid=None, positions: Optional[torch.Tensor] = None):
        # grid unused: RoPE takes each token's position from ``positions`` (full sequence if None).
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), positions)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


@register_backbone("lightningdit", sizes=DIT_SIZES)
class LightningDiT(ConditionedPatchStack, BlockStack):
    """DiT's sizes (S/B/L/XL with patch 2, 4, 8, and tiny) with LightningDiT blocks."""

    scan_mixing = False

    def __init__(self, depth=12, hidden_size=384, num_heads=6, patch_size=2, mlp_ratio=4.0, qk_norm=True,
                 rope_theta=10000.0, input_size=32, in_channels=4, num_classes=1000):
        super().__init__()
        self._init_io(input_size, patch_size, in_channels, hidden_size, num_classes)
        self.final_layer.norm = RMSNorm(hidden_size)
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.rope = AxialRoPE2d(hidden_size // num_heads, self.grid_size, rope_theta)
        self.blocks = nn.ModuleList(LightningDiTBlock(hidden_size, num_heads, self.rope, mlp_ratio, qk_norm)
                                    for _ in range(depth))
        self._init_dit_weights()
