"""SPRINT (ICLR 2026; github snap-research/Sprint, ``src/models/sit.py``) as a method plug-in.

Sparse-dense residual fusion on any backbone's blocks: the first ``dense_head`` and last ``dense_tail`` blocks see
every token, the middle ones only the kept tokens (``drop_ratio`` dropped, in groups); their output, padded with the
mask token, is fused with the shallow tokens by a Linear on ``cat([sparse, shallow])``. Tokens are dropped in
training only; ``force_rate=1.0`` drops the whole sparse path (the weak branch of path-drop guidance).
Details: docs/internals.md#tread_benchmethodssprintpy
"""
from __future__ import annotations

from numbers import Integral, Real
from typing import List, Optional, Tuple

import torch
from torch import nn

from backbones.protocol import BlockStack, embed_tokens, full_positions
from tread_bench.core.devices import to_device
from tread_bench.core.errors import ConfigError
from routing.router import gather_tokens, scatter_tokens
from routing.selection import kept_count, random_selection, row_selection

from .registry import SeededMethod, register_method

GROUPINGS = ("auto", "structured", "subgrid", "rows", "random")
#: a drop ratio of 1.0 (forced only): the whole sparse path is dropped, nothing is gathered
PATH_DROPPED = 1.0


def structured_selection(batch: int, grid: Tuple[int, int], group: int, keep_per_group: int,
                         generator: torch.Generator, device) -> torch.Tensor:
    """SPRINT's structured grouping with random offsets: each g x g group of the (rows, cols) grid keeps
    ``keep_per_group`` of its tokens (top-k of uniform noise drawn as the official code draws it).
    Returns (B, groups * keep_per_group) kept ids in ascending raster order."""
    rows, cols = grid
    group_rows, group_cols = rows // group, cols // group
    noise = torch.rand(batch, group_rows, group_cols, group * group, generator=generator)
    offsets = noise.topk(keep_per_group, dim=-1).indices              # (B, gr, gc, k) within each group
    row = torch.arange(group_rows)[None, :, None, None] * group + offsets // group
    col = torch.arange(group_cols)[None, None, :, None] * group + offsets % group
    return to_device((row * cols + col).reshape(batch, -1).sort(dim=1).values, device)


def subgrid_selection(batch: int, grid: Tuple[int, int], group: int, generator: torch.Generator,
                      device) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """One token per g x g group at one random offset per sample (the same in every group): the kept tokens
    are the (rows/g, cols/g) sub-grid at that offset, in raster order. Returns (ids, kept grid)."""
    rows, cols = grid
    offset = torch.rand(batch, group * group, generator=generator).argmax(dim=1)  # (B,)
    row = torch.arange(0, rows, group)[None, :] + (offset // group)[:, None]      # (B, rows/g)
    col = torch.arange(0, cols, group)[None, :] + (offset % group)[:, None]       # (B, cols/g)
    ids = (row[:, :, None] * cols + col[:, None, :]).reshape(batch, -1)
    return to_device(ids, device), (rows // group, cols // group)


def _whole(value: float) -> Optional[int]:
    """``value`` as an int when it is one up to float rounding (0.25 * 16 = 4), else None."""
    nearest = round(value)
    return int(nearest) if abs(value - nearest) < 1e-9 else None


def _group_sizes(grid: Tuple[int, int], group_size: Optional[int]) -> List[int]:
    rows, cols = grid
    if group_size is not None:
        return [group_size]
    return [g for g in range(2, min(rows, cols) + 1) if rows % g == 0 and cols % g == 0]


def structured_groups(rate: float, grid: Tuple[int, int], group_size: Optional[int] = None) -> Tuple[int, int]:
    """(g, k) of structured grouping at drop ``rate``: the smallest g >= 2 dividing the grid (or
    ``group_size``) for which each g x g group keeps a whole number k = (1 - rate) g^2 of tokens."""
    for g in _group_sizes(grid, group_size):
        keep = _whole((1 - rate) * g * g)
        if keep is not None and 0 < keep < g * g:
            return g, keep
    options = [f"g={g}: " + (", ".join(f"{1 - k / (g * g):g}" for k in range(g * g - 1, 0, -1)) if g == 2
                             else f"a multiple of 1/{g * g}") for g in _group_sizes(grid, group_size)[:2]]
    raise ConfigError(
        f"sprint: drop ratio {rate:g} cannot be made by structured grouping on the {grid[0]}x{grid[1]} token grid"
        + (f" with group_size {group_size}" if group_size is not None else "")
        + f" (each g x g group keeps k tokens, so the ratio must be 1 - k/g^2; {'; '.join(options) or 'no g fits'});"
          " choose such a drop_ratio or grouping: random")


def subgrid_group(rate: float, grid: Tuple[int, int], group_size: Optional[int] = None) -> Optional[int]:
    """g of sub-grid grouping at drop ``rate`` (one token kept per g x g group: rate = 1 - 1/g^2), or None."""
    for g in _group_sizes(grid, group_size):
        if _whole((1 - rate) * g * g) == 1:
            return g
    return None


@register_method("sprint")
class SPRINT(SeededMethod):
    """Dense head blocks, sparse middle blocks on a grouped subset of the tokens, sparse-dense residual
    fusion (a Linear over the concatenated sparse and shallow features), dense tail blocks."""

    def __init__(self, backbone: BlockStack, drop_ratio: float = 0.75, dense_head: int = 2, dense_tail: int = 2,
                 grouping: str = "auto", group_size: Optional[int] = None, path_drop_prob: float = 0.1,
                 learn_mask_token: bool = False, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        depth = backbone.depth
        for name, value in (("dense_head", dense_head), ("dense_tail", dense_tail)):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise ConfigError(f"sprint: {name} = {value!r} must be a whole number of blocks >= 0; e.g. {name}: 2")
        if dense_head + dense_tail >= depth:
            raise ConfigError(f"sprint: dense_head {dense_head} + dense_tail {dense_tail} leaves no sparse block in "
                              f"the backbone's {depth} blocks; use dense_head + dense_tail <= {depth - 1}")
        self.drop_ratio = self._check_fraction("drop_ratio", drop_ratio, "the fraction of tokens the middle blocks "
                                               "drop in training; e.g. drop_ratio: 0.75")
        self.path_drop_prob = self._check_fraction("path_drop_prob", path_drop_prob, "the fraction of training "
                                                   "samples whose sparse path is dropped; e.g. path_drop_prob: 0.1")
        if not isinstance(learn_mask_token, bool):
            raise ConfigError(f"sprint: learn_mask_token = {learn_mask_token!r} must be true or false")
        if grouping not in GROUPINGS:
            raise ConfigError(f"sprint: unknown grouping '{grouping}'; choose one of {', '.join(GROUPINGS)}")
        rows, cols = backbone.grid_size
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, Integral)
                                       or group_size < 2 or rows % group_size or cols % group_size):
            raise ConfigError(f"sprint: group_size = {group_size!r} must be a whole number >= 2 dividing the "
                              f"{rows}x{cols} token grid, or null (the smallest that makes the drop ratio)")
        self.grouping = grouping  # as written: "auto" is resolved again when a schedule changes the ratio
        self.group_size = group_size
        self.selection = self._resolve_grouping(self.drop_ratio)
        self.dense_head, self.dense_tail = int(dense_head), int(dense_tail)
        self.middle = range(self.dense_head, depth - self.dense_tail)
        dim = self._width(backbone)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim), requires_grad=learn_mask_token)
        self.fusion = nn.Linear(2 * dim, dim)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.xavier_uniform_(self.fusion.weight)
        nn.init.zeros_(self.fusion.bias)
        self.generator = torch.Generator().manual_seed(seed)
        self.shard = (0, 1)
        self.kept_tokens(self.drop_ratio)  # an impossible ratio for the grouping is refused at build time

    def _resolve_grouping(self, rate: float) -> str:
        """The grouping at drop ``rate``: as written, or for ``auto`` structured (attention backbones), else a
        sub-grid if the ratio allows it and whole rows otherwise (scans need kept tokens on a grid)."""
        if self.grouping != "auto":
            return self.grouping
        bb = self.backbone
        if not bb.scan_mixing:
            return "structured"
        return "subgrid" if subgrid_group(rate, bb.grid_size, self.group_size) else "rows"

    #: a schedule may change the drop ratio (the official dense fine-tune: drop_ratio 0, path drop kept) and the
    #: path-drop probability; the fusion layer and the mask token stay
    schedulable = ("drop_ratio", "path_drop_prob")

    def apply_settings(self, **settings) -> None:
        self.refuse_unschedulable(settings)
        ratio = (self._check_fraction("drop_ratio", settings["drop_ratio"], "the fraction of tokens the middle "
                                      "blocks drop in training; e.g. drop_ratio: 0.75")
                 if "drop_ratio" in settings else self.drop_ratio)
        path_drop = (self._check_fraction("path_drop_prob", settings["path_drop_prob"], "the fraction of training "
                                          "samples whose sparse path is dropped; e.g. path_drop_prob: 0.1")
                     if "path_drop_prob" in settings else self.path_drop_prob)
        # at ratio 0 nothing is selected: keep the grouping (a network built at 0 differs only in this unused name)
        selection = self._resolve_grouping(ratio) if ratio > 0 else self.selection
        previous = self.selection
        self.selection = selection
        try:
            self.kept_tokens(ratio)  # a ratio the grouping cannot make is refused, as at build time
        except ConfigError:
            self.selection = previous
            raise
        self.drop_ratio, self.path_drop_prob = ratio, path_drop

    @staticmethod
    def _check_fraction(name: str, value, meaning: str) -> float:
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < 1:
            raise ConfigError(f"sprint: {name} = {value!r} must be in [0, 1) ({meaning})")
        return float(value)

    @staticmethod
    def _width(backbone: BlockStack) -> int:
        """Token width D: the protocol does not name it, so embed one zero image where the backbone lives
        (on the meta device when the network is built there for validation or FLOP counting)."""
        device = next(iter(backbone.parameters())).device
        x = torch.zeros(1, backbone.in_channels, backbone.input_size, backbone.input_size, device=device)
        with torch.no_grad():
            tokens, _ = backbone.embed(x, torch.zeros(1, device=device), torch.zeros(1, dtype=torch.long, device=device))
        return int(tokens.shape[-1])

    def extra_repr(self) -> str:
        return f"{self.describe()}, grouping={self.selection}"

    # -- which tokens the middle blocks keep ---------------------------------------------------------
    def _rate(self, force_rate: Optional[float]) -> float:
        if force_rate is None:
            return self.drop_ratio if self.training else 0.0
        rate = float(force_rate)
        if not 0 <= rate <= PATH_DROPPED:
            raise ConfigError(f"sprint: force_rate {force_rate} must be in [0, 1] (the fraction of tokens the middle "
                              "blocks drop; 1 drops the whole sparse path)")
        return rate

    def kept_tokens(self, rate: float) -> int:
        """Tokens each middle block sees at drop ``rate`` under this grouping (an impossible one raises)."""
        bb = self.backbone
        (rows, cols), n = bb.grid_size, bb.num_tokens
        if rate >= PATH_DROPPED:
            return 0
        if rate == 0:
            return n
        if self.selection == "structured":
            g, keep = structured_groups(rate, bb.grid_size, self.group_size)
            return n // (g * g) * keep
        if self.selection == "subgrid":
            g = subgrid_group(rate, bb.grid_size, self.group_size)
            if g is None:
                raise ConfigError(f"sprint: drop ratio {rate:g} cannot be made by sub-grid grouping (one token per "
                                  f"g x g group: 1 - 1/g^2 with g dividing the {rows}x{cols} grid, e.g. 0.75); "
                                  "choose such a ratio or grouping: rows")
            return n // (g * g)
        if self.selection == "rows":
            kept_rows = kept_count(rows, rate)
            if kept_rows == 0:
                raise ConfigError(f"sprint: drop ratio {rate:g} keeps no row of the {rows}-row grid; use a lower ratio")
            return kept_rows * cols
        kept = kept_count(n, rate)
        if kept == 0:
            raise ConfigError(f"sprint: drop ratio {rate:g} keeps no token of {n}; use a lower ratio")
        return kept

    def _select(self, batch: int, rate: float, device):
        """(ids, grid of the kept tokens or None) for this process's slice of a global-batch draw."""
        self.kept_tokens(rate)  # refuse an impossible forced rate with the grouping's message
        rank, world = self.shard
        total, grid = batch * world, self.backbone.grid_size
        kept_grid = None
        if self.selection == "structured":
            g, keep = structured_groups(rate, grid, self.group_size)
            ids = structured_selection(total, grid, g, keep, self.generator, device)
        elif self.selection == "subgrid":
            ids, kept_grid = subgrid_selection(total, grid, subgrid_group(rate, grid, self.group_size),
                                               self.generator, device)
        elif self.selection == "rows":
            ids, kept_grid = row_selection(total, grid, rate, self.generator, device)
        else:
            n = self.backbone.num_tokens
            ids = random_selection(total, n, kept_count(n, rate), self.generator, device)
        return ids[rank * batch:(rank + 1) * batch], kept_grid

    def _path_dropped(self, batch: int, device) -> torch.Tensor:
        """(B,) bool: samples whose whole sparse output is replaced by mask tokens (training's path drop)."""
        rank, world = self.shard
        drawn = torch.rand(batch * world, generator=self.generator) < self.path_drop_prob
        return to_device(drawn[rank * batch:(rank + 1) * batch], device)

    # -- the network ---------------------------------------------------------------------------------
    def forward(self, x, noise_labels, class_labels, force_rate: Optional[float] = None,
                return_token_masks: bool = False):
        bb = self.backbone
        rate = self._rate(force_rate)
        tokens, cond = embed_tokens(bb, x, noise_labels, class_labels)
        b, n, d = tokens.shape
        grid, positions = bb.grid_size, full_positions(b, n, tokens.device)
        blocks = list(bb.blocks)
        for block in blocks[:self.dense_head]:
            tokens = block(tokens, cond, grid, positions)
        shallow = tokens
        masks = []
        canvas = self.mask_token.expand(b, n, d)
        if rate >= PATH_DROPPED:  # the sparse path dropped: its blocks are skipped, only mask tokens are fused
            sparse = canvas
        elif rate > 0:
            ids, kept_grid = self._select(b, rate, tokens.device)
            kept = gather_tokens(tokens, ids)
            for i in self.middle:  # each kept token at its true position (RoPE in lightningdit uses it)
                kept = blocks[i](kept, cond, kept_grid, ids)
            sparse = scatter_tokens(canvas.to(kept.dtype), ids, kept)  # padded back with the mask token
            if return_token_masks:
                mask = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
                masks.append(mask.scatter_(1, ids, True).view(b, *grid))
        else:  # dense inference (or a drop_ratio 0 stage): the middle blocks see every token
            sparse = tokens
            for i in self.middle:
                sparse = blocks[i](sparse, cond, grid, positions)
        if self.training and self.path_drop_prob > 0:
            dropped = self._path_dropped(b, tokens.device)
            sparse = torch.where(dropped[:, None, None], canvas, sparse)
        tokens = self.fusion(torch.cat([sparse, shallow], dim=-1))  # sparse-dense residual fusion
        for block in blocks[len(blocks) - self.dense_tail:]:
            tokens = block(tokens, cond, grid, positions)
        out = bb.head(tokens, cond)
        return (out, masks) if return_token_masks else out

    # -- the rest of the Method interface -------------------------------------------------------------

    def describe(self) -> str:
        last = self.backbone.depth - self.dense_tail - 1
        path_drop = f", path drop {self.path_drop_prob:g}" if self.path_drop_prob else ""
        return f"sprint({self.dense_head}->{last})@{self.drop_ratio:g}{path_drop}"

    def tokens_per_block(self, force_rate: Optional[float] = None) -> List[int]:
        """Training forward (drop_ratio), or any forward at ``force_rate``; 0 for the middle blocks when the
        whole sparse path is dropped (force_rate 1.0: they are not called)."""
        bb = self.backbone
        rate = self.drop_ratio if force_rate is None else self._rate(force_rate)
        tokens = [bb.num_tokens] * bb.depth
        for i in self.middle:
            tokens[i] = self.kept_tokens(rate)
        return tokens


__all__ = ["SPRINT", "structured_selection", "subgrid_selection", "structured_groups", "subgrid_group"]
