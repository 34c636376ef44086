"""The block-stack protocol: the only thing routing and diffusion know about a backbone::

    tokens, cond = backbone.embed(x, noise_labels, class_labels)   # (B, N, D) made contiguous, (B, D)
    for block in backbone.blocks:                                  # nn.ModuleList
        tokens = block(tokens, cond, grid, positions)              # grid = (rows, cols) or None
    out = backbone.head(tokens, cond)                              # same shape as x

``positions``: the (B, n) indices, in the full raster grid, of the tokens a block holds (the kept ids in a route).
Details: docs/internals.md#backbonesprotocolpy
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

Grid = Optional[Tuple[int, int]]


def embed_tokens(backbone: "BlockStack", x, noise_labels, class_labels):
    """``backbone.embed`` with the tokens made contiguous (B, N, D): a patch embedding's transposed view would
    make every full-sequence block work on strided memory while routed blocks, fed by a gather, do not, which
    biases a measured speedup. Everything that drives a BlockStack embeds through this."""
    tokens, cond = backbone.embed(x, noise_labels, class_labels)
    return tokens.contiguous(), cond


def full_positions(batch: int, num_tokens: int, device) -> torch.Tensor:
    """Positions of the full sequence: ``arange(num_tokens)`` for every sample, shape (B, N)."""
    return torch.arange(num_tokens, device=device).expand(batch, num_tokens)


def weight_decay_groups(module: nn.Module, weight_decay: float):
    """AdamW parameter groups of ``module``: parameters flagged ``no_weight_decay`` get weight decay 0, the
    others ``weight_decay``. Without decay or flagged parameters: the plain parameter list (one group, so
    checkpoints of either kind load)."""
    params = [p for p in module.parameters()]
    no_decay = [p for p in params if getattr(p, "no_weight_decay", False)]
    if not weight_decay or not no_decay:
        return params
    flagged = {id(p) for p in no_decay}
    return [{"params": [p for p in params if id(p) not in flagged]},
            {"params": no_decay, "weight_decay": 0.0}]


class BlockStack(nn.Module):
    """Base class for backbones. Subclasses set the attributes below and implement three methods."""

    #: (rows, cols) of the token grid produced by ``embed``.
    grid_size: Tuple[int, int]
    #: True when a block mixes tokens by a scan over the raster order (RWKV, Mamba): such
    #: backbones are sensitive to which positions are removed, so routing keeps whole rows.
    scan_mixing: bool = False
    blocks: nn.ModuleList
    num_classes: int
    in_channels: int
    input_size: int

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def embed(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor):
        raise NotImplementedError

    def head(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, noise_labels, class_labels):
        """Plain full-sequence forward (no routing)."""
        tokens, cond = embed_tokens(self, x, noise_labels, class_labels)
        positions = full_positions(tokens.shape[0], tokens.shape[1], tokens.device)
        for block in self.blocks:
            tokens = block(tokens, cond, self.grid_size, positions)
        return self.head(tokens, cond)
