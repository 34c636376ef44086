"""Toy BlockStacks whose routed outputs can be computed by hand."""
import torch
from torch import nn

from backbones.protocol import BlockStack


class AddBlock(nn.Module):
    """x + c_k (a learnable constant); records the grid, positions and autocast state it was called with."""

    def __init__(self, value: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(value)))
        self.calls = []

    def forward(self, x, cond, grid, positions):
        self.calls.append({"grid": grid, "positions": positions, "n": x.shape[1], "dtype": x.dtype,
                           "autocast": torch.is_autocast_enabled(x.device.type)})
        return x + self.c


class AdditiveStack(BlockStack):
    """Tokens = pixels of a (1, H, W) image; block k adds 10**k so each block's contribution is readable."""

    def __init__(self, depth=6, rows=4, cols=4, scan_mixing=False):
        super().__init__()
        self.grid_size, self.scan_mixing = (rows, cols), scan_mixing
        self.input_size, self.in_channels, self.num_classes = rows, 1, 2
        self.blocks = nn.ModuleList(AddBlock(10.0 ** k) for k in range(depth))

    def embed(self, x, noise_labels, class_labels):
        return x.flatten(2).transpose(1, 2), torch.zeros(x.shape[0], 1, device=x.device)

    def head(self, tokens, cond):
        return tokens.transpose(1, 2).reshape(tokens.shape[0], 1, *self.grid_size)
