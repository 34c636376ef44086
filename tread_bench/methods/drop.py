"""Drop-and-discard as a method plug-in: the naive reference that MaskDiT, TREAD and SPRINT argue against.

Per sample, a fraction ``rate`` of the tokens (whole rows on scan-mixing backbones) is dropped before block
``start`` and never comes back; the loss is taken on the kept tokens only, and the output is 0 at the dropped ones.
``start: 0`` is MaskDiT without its decoder, ``start: i`` TREAD without reinsertion. :class:`TokenDropper` is the
kept-token draw MaskDiT shares (made for the global batch from the method's CPU generator, sliced per process).
Details: docs/internals.md#tread_benchmethodsdroppy
"""
from __future__ import annotations

from numbers import Integral, Real
from typing import List, Optional, Tuple

import torch

from backbones.protocol import BlockStack, embed_tokens, full_positions
from tread_bench.core.errors import ConfigError
from routing.router import gather_tokens, scatter_tokens
from routing.selection import SELECTIONS, kept_tokens, select

from .registry import LossTerms, SeededMethod, register_method


class TokenDropper(SeededMethod):
    """A method that drops a random subset of the tokens per sample (whole rows with ``selection: rows``).

    Subclasses name their training rate (``training_rate``) and use :meth:`active_rate`, :meth:`draw` and
    :meth:`kept_mask` in their forward. Kept counts follow routing's convention: ``floor(n * rate)`` tokens
    (or rows) dropped, so a rate keeps the same number of tokens as a TREAD route at that rate.
    """

    shapes_loss = True

    def __init__(self, backbone: BlockStack, kind: str, selection: str = "auto", seed: int = 0):
        super().__init__()
        self.backbone, self.kind = backbone, kind
        if selection == "auto":
            selection = "rows" if backbone.scan_mixing else "random"
        if selection not in SELECTIONS:
            raise ConfigError(f"{kind}: unknown selection '{selection}'; choose one of {', '.join(SELECTIONS)} or auto")
        self.selection = selection
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise ConfigError(f"{kind}: seed = {seed!r} must be a whole number")
        self.generator = torch.Generator().manual_seed(int(seed))
        # Data-parallel shard (rank, world): the draw is made for the global batch and sliced.
        self.shard = (0, 1)

    def training_rate(self) -> float:
        """The fraction of tokens dropped in a training forward."""
        raise NotImplementedError

    def check_rate(self, name: str, value) -> float:
        """``value`` as a drop fraction in [0, 1); anything else is a ConfigError naming ``name``. Below 1 a draw
        always keeps at least one token (and one row): floor(n * rate) < n."""
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < 1:
            raise ConfigError(f"{self.kind}: {name} = {value!r} must be a number in [0, 1) (the fraction of tokens "
                              f"dropped); e.g. {name}: 0.5")
        return float(value)

    def active_rate(self, force_rate: Optional[float]) -> float:
        """The rate of this forward: the training rate in training mode, none in eval mode, or the forced one."""
        if force_rate is None:
            return self.training_rate() if self.training else 0.0
        return self.check_rate("force_rate", force_rate)

    def kept_tokens(self, rate: float) -> int:
        """Tokens a sample keeps at drop ``rate``."""
        return kept_tokens(self.backbone.num_tokens, self.backbone.grid_size, rate, self.selection)

    def draw(self, batch: int, rate: float, device) -> Tuple[torch.Tensor, Optional[Tuple[int, int]]]:
        """(B, kept) ascending kept ids of this process's samples, and the grid they form (rows) or None."""
        rank, world = self.shard
        bb = self.backbone
        ids, grid = select(self.selection, batch * world, bb.grid_size, bb.num_tokens, rate, self.generator, device)
        return ids[rank * batch:(rank + 1) * batch], grid

    def kept_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) bool: True at the kept tokens."""
        mask = torch.zeros(ids.shape[0], self.backbone.num_tokens, dtype=torch.bool, device=ids.device)
        # a tensor source, not the scalar True: the jit trace of the FLOP counter has no bool-scalar scatter
        return mask.scatter(1, ids, torch.ones_like(ids, dtype=torch.bool)).view(-1, *self.backbone.grid_size)

    def extra_repr(self) -> str:
        return f"{self.describe()}, selection={self.selection}"

    def refuse_token_masks(self):
        raise ConfigError(f"{self.kind} composes its own training loss (kept tokens only); the route-aware loss "
                          "(TREAD v1) does not apply to it: set suite.train.route_aware_loss: false")

    def begin_forward(self, x, noise_labels, class_labels, force_rate: Optional[float], return_token_masks: bool):
        """What every dropper's forward starts with: (tokens, cond, rate in force, full grid, positions 0..n-1)."""
        if return_token_masks:
            self.refuse_token_masks()
        tokens, cond = embed_tokens(self.backbone, x, noise_labels, class_labels)
        positions = full_positions(tokens.shape[0], tokens.shape[1], tokens.device)
        return tokens, cond, self.active_rate(force_rate), self.backbone.grid_size, positions



def pixel_mask(token_mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, rows, cols) token mask -> (B, 1, height, width): each token's value on its patch of pixels."""
    rows, cols = token_mask.shape[-2:]
    return token_mask.repeat_interleave(height // rows, dim=-2).repeat_interleave(width // cols, dim=-1)[:, None]


@register_method("drop")
class Drop(TokenDropper):
    """``rate`` of the tokens dropped before block ``start``, never reinserted; loss on the kept tokens."""

    def __init__(self, backbone: BlockStack, rate: float = 0.5, start: int = 0, selection: str = "auto",
                 seed: int = 0):
        super().__init__(backbone, "drop", selection, seed)
        self.start = self._check_start(start)
        self.rate = self.check_rate("rate", rate)

    def _check_start(self, start) -> int:
        depth = self.backbone.depth
        if isinstance(start, bool) or not isinstance(start, Integral) or not 0 <= start < depth:
            raise ConfigError(f"drop: start = {start!r} must be a block index in [0, {depth - 1}] (the first block "
                              "that sees only the kept tokens); e.g. start: 0")
        return int(start)

    def training_rate(self) -> float:
        return self.rate

    #: a schedule may change the drop rate (0: a fine-tune on every token) and the first dropping block
    schedulable = ("rate", "start")

    def apply_settings(self, **settings) -> None:
        self.refuse_unschedulable(settings)
        rate = self.check_rate("rate", settings["rate"]) if "rate" in settings else self.rate
        start = self._check_start(settings["start"]) if "start" in settings else self.start
        self.rate, self.start = rate, start

    def forward(self, x, noise_labels, class_labels, force_rate: Optional[float] = None,
                return_token_masks: bool = False, return_loss_terms: bool = False):
        bb = self.backbone
        tokens, cond, rate, grid, positions = self.begin_forward(x, noise_labels, class_labels, force_rate,
                                                                   return_token_masks)
        (b, n), ids = tokens.shape[:2], None
        for i, block in enumerate(bb.blocks):
            if i == self.start and rate > 0:
                ids, grid = self.draw(b, rate, tokens.device)
                tokens, positions = gather_tokens(tokens, ids), ids
            tokens = block(tokens, cond, grid, positions)
        if ids is None:
            out = bb.head(tokens, cond)
            return (out, None) if return_loss_terms else out
        out = bb.head(scatter_tokens(tokens.new_zeros(b, n, tokens.shape[-1]), ids, tokens), cond)
        kept = self.kept_mask(ids)
        out = out * pixel_mask(kept, *out.shape[-2:]).to(out.dtype)  # no output where the token was discarded
        return (out, LossTerms(token_weights=kept)) if return_loss_terms else out

    def describe(self) -> str:
        return f"drop({self.start}->{self.backbone.depth - 1})@{self.rate:g}"

    def tokens_per_block(self, force_rate: Optional[float] = None) -> List[int]:
        bb = self.backbone
        rate = self.rate if force_rate is None else self.check_rate("force_rate", force_rate)
        return [bb.num_tokens] * self.start + [self.kept_tokens(rate)] * (bb.depth - self.start)


__all__ = ["Drop", "TokenDropper", "pixel_mask"]
