"""Layers shared by every backbone: conditioning embedders, patch in/out, positional embedding.

Keeping them in one place (as timm does) means the three architectures differ only in their
token mixer, which is what the architecture-agnostic comparison is about.
"""
from __future__ import annotations

import math

import torch
from timm.layers import PatchEmbed
from torch import nn

from tread_bench.core.errors import ConfigError


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (continuous) noise label followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        half = frequency_size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, index ``num_classes``, for the dropped (unconditional) label."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)


def sincos_pos_embed_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding (MAE/DiT layout), shape (rows*cols, dim)."""
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for a 2-D sin-cos embedding")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij")

    def encode(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    # DiT puts the column (w) encoding first, then the row (h) encoding.
    return torch.cat([encode(xs), encode(ys)], dim=1).float()


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + linear projection to patch pixels (zero-initialised)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.zero_init()

    def zero_init(self):
        for layer in (self.linear, self.adaLN_modulation[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


def unpatchify(x: torch.Tensor, rows: int, cols: int, patch: int, channels: int) -> torch.Tensor:
    """(B, rows*cols, patch*patch*C) -> (B, C, rows*patch, cols*patch)."""
    b = x.shape[0]
    x = x.reshape(b, rows, cols, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, rows * patch, cols * patch)


def xavier_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ConditionedPatchStack(nn.Module):
    """The embed/head half every backbone here shares: patches + pos-embed in, patches out,
    timestep + class embedding as the conditioning vector."""

    def _init_io(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, num_classes: int):
        if input_size % patch_size:
            raise ConfigError(f"input size {input_size} is not divisible by the patch size {patch_size}: set the data "
                              f"resolution (suite.data.resolution) to a multiple of {patch_size}, or pick a backbone "
                              f"size whose patch size divides {input_size}")
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.patch_size, self.hidden_size = patch_size, hidden_size
        self.grid_size = (input_size // patch_size, input_size // patch_size)
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, *self.grid_size)[None], persistent=False)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)

    def _init_dit_weights(self):
        """DiT's init: xavier linears, adaLN-Zero (every block's modulation starts at zero, so each
        residual branch starts closed), then the embedders and the zero head."""
        self.apply(xavier_linear)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        self._init_io_weights()

    def _init_io_weights(self):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        self.final_layer.zero_init()

    def embed(self, x, noise_labels, class_labels):
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, {self.input_size}, {self.input_size}), got {tuple(x.shape)}"
            )
        tokens = (self.x_embedder(x) + self.pos_embed).contiguous()  # PatchEmbed's output is a transposed view
        cond = self.t_embedder(noise_labels) + self.y_embedder(class_labels)
        return tokens, cond

    def head(self, tokens, cond):
        return unpatchify(self.final_layer(tokens, cond), *self.grid_size, self.patch_size, self.in_channels)
