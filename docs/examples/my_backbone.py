"""A complete backbone plug-in: a small transformer with adaLN-style conditioning, registered as ``my_net``.

Run it (from this folder, or with it on PYTHONPATH)::

    python /path/to/run_suite.py suite=smoke scale=tiny "imports=[my_backbone]" \
        "suite.backbones=[{name: my_net, size: tiny}]"
"""
import math

import torch
from torch import nn

from backbones import BlockStack, register_backbone


def timestep_features(noise_labels: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the (B,) noise labels, as DiT embeds timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=noise_labels.device) / half)
    angles = noise_labels.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class Block(nn.Module):
    """Attention + MLP; the condition shifts and scales each normalised input."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, elementwise_affine=False), nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.modulation = nn.Linear(dim, 4 * dim)

    def forward(self, tokens, cond, grid=None, positions=None):  # the protocol's call; positions unused here
        shift1, scale1, shift2, scale2 = self.modulation(cond)[:, None].chunk(4, dim=-1)
        h = self.norm1(tokens) * (1 + scale1) + shift1
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        return tokens + self.mlp(self.norm2(tokens) * (1 + scale2) + shift2)


@register_backbone("my_net", sizes={"tiny": dict(depth=4, dim=64, heads=4), "XS/4": dict(depth=6, dim=96, heads=4)})
class MyNet(BlockStack):
    scan_mixing = False  # attention mixes all tokens at once: TREAD may keep any subset

    def __init__(self, depth, dim, heads, patch_size=4, input_size=32, in_channels=4, num_classes=1000):
        super().__init__()
        self.input_size, self.in_channels, self.num_classes, self.patch_size = input_size, in_channels, num_classes, patch_size
        self.grid_size = (input_size // patch_size, input_size // patch_size)
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        # num_classes + 1 rows: label dropout feeds the unconditional label, the index num_classes
        self.class_embed = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, patch_size * patch_size * in_channels)
        self.dim = dim

    def embed(self, x, noise_labels, class_labels):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        cond = self.time_embed(timestep_features(noise_labels, self.dim)) + self.class_embed(class_labels)
        return tokens, cond

    def head(self, tokens, cond):
        rows, cols = self.grid_size
        p, c = self.patch_size, self.in_channels
        out = self.out(tokens).reshape(-1, rows, cols, p, p, c)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(-1, c, rows * p, cols * p)
