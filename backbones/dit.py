"""DiT (Peebles & Xie 2023): transformer blocks with adaLN-Zero conditioning."""
from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn
from torch.nn import functional as F

from .layers import ConditionedPatchStack, modulate
from .protocol import BlockStack
from .registry import register_backbone


class SelfAttention(nn.Module):
    """Multi-head self-attention on PyTorch's fused scaled-dot-product kernel."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, grid=None, positions=None):  # both unused: attention is permutation-equivariant
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


DIT_SIZES = {
    "S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "S/4": dict(depth=12, hidden_size=384, num_heads=6, patch_size=4),
    "S/8": dict(depth=12, hidden_size=384, num_heads=6, patch_size=8),
    "B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "B/4": dict(depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "B/8": dict(depth=12, hidden_size=768, num_heads=12, patch_size=8),
    "L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "L/4": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=4),
    "L/8": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=8),
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "XL/4": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=4),
    "XL/8": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=8),
    # CPU-test size: 6 blocks of width 64 over an 8x8 token grid (32x32 input, patch 4).
    # CPU-study size (scale=cpu): the paper's 12 blocks, so its routes apply unchanged, at width 64.
    "XS/4": dict(depth=12, hidden_size=64, num_heads=4, patch_size=4),
    "tiny": dict(depth=6, hidden_size=64, num_heads=4, patch_size=4),
    # The crossover map (suite=crossover): XS/4 varied one axis at a time, width (w128, w192: heads of 32) or
    # tokens (patch 2: 16x16 = 256 tokens).
    "XS/2": dict(depth=12, hidden_size=64, num_heads=4, patch_size=2),
    "w128/4": dict(depth=12, hidden_size=128, num_heads=4, patch_size=4),
    "w192/4": dict(depth=12, hidden_size=192, num_heads=6, patch_size=4),
}


@register_backbone("dit", sizes=DIT_SIZES)
class DiT(ConditionedPatchStack, BlockStack):
    def __init__(self, depth=12, hidden_size=384, num_heads=6, patch_size=2, mlp_ratio=4.0,
                 input_size=32, in_channels=4, num_classes=1000):
        super().__init__()
        self._init_io(input_size, patch_size, in_channels, hidden_size, num_classes)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self._init_dit_weights()

