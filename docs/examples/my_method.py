"""A complete method plug-in: ``keep_middle`` keeps a random ``keep`` fraction of the tokens through the middle blocks
and scatters them back before the last block (one TREAD-like route, written with the routing helpers).

Run it (from this folder, or with it on PYTHONPATH)::

    python /path/to/run_suite.py suite=smoke scale=tiny "imports=[my_method]" \
        "+suite.methods.mine={kind: keep_middle, keep: 0.5}"
"""
from typing import Optional

import torch

from backbones.protocol import embed_tokens, full_positions
from routing import gather_tokens, kept_count, random_selection, scatter_tokens
from tread_bench.core.errors import ConfigError
from tread_bench.methods import SeededMethod, register_method


@register_method("keep_middle")
class KeepMiddle(SeededMethod):
    selection = "random"

    def __init__(self, backbone, keep: float = 0.5, seed: int = 0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)  # CPU: the same draws on every device
        if not 0 < keep <= 1:
            raise ConfigError(f"keep_middle: keep = {keep} must be in (0, 1]")
        if backbone.depth < 3:
            raise ConfigError(f"keep_middle needs at least 3 blocks, got {backbone.depth}")
        self.backbone, self.keep = backbone, keep

    def kept(self, force_rate: Optional[float]) -> int:
        """Tokens the middle blocks see, a plain int (the FLOP counter traces forward: no tensor sizes)."""
        n = int(self.backbone.num_tokens)
        if force_rate is not None:
            return kept_count(n, force_rate)
        return int(n * self.keep) if self.training else n

    def forward(self, x, noise_labels, class_labels, force_rate=None, return_token_masks=False):
        bb = self.backbone
        tokens, cond = embed_tokens(bb, x, noise_labels, class_labels)
        batch, n = tokens.shape[0], int(bb.num_tokens)
        positions = full_positions(batch, n, tokens.device)
        kept = self.kept(force_rate)
        tokens = bb.blocks[0](tokens, cond, bb.grid_size, positions)
        saved, ids = tokens, None
        if kept < n:
            rank, world = self.shard
            ids = random_selection(batch * world, n, kept, self.generator, tokens.device)
            ids = ids[rank * batch:(rank + 1) * batch]
            tokens = gather_tokens(tokens, ids)
        for block in bb.blocks[1:-1]:
            tokens = block(tokens, cond, None if ids is not None else bb.grid_size,
                           ids if ids is not None else positions)
        if ids is not None:
            tokens = scatter_tokens(saved, ids, tokens)
        tokens = bb.blocks[-1](tokens, cond, bb.grid_size, positions)
        out = bb.head(tokens, cond)
        return (out, []) if return_token_masks else out

    def describe(self) -> str:
        return f"keep {self.keep:g} of the tokens in blocks 1..{self.backbone.depth - 2}"

    def tokens_per_block(self, force_rate=None):
        n, kept = int(self.backbone.num_tokens), self.kept(force_rate)
        return [n] + [kept] * (self.backbone.depth - 2) + [n]
