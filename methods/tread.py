"""TREAD (Krause et al., ICCV 2025) as a method plug-in: routing.RoutedNetwork behind the Method interface.

routing/ stays the backbone-agnostic routing library (routes, selection, the router); this file only
adapts it. Suite entry: ``{routes: [{start, end, rate}, ...], selection: auto|random|rows}`` (``kind:
tread`` is the default kind); no routes is the baseline (the full network).
"""
from __future__ import annotations

from typing import List, Optional

from routing import RoutedNetwork, Route

from .registry import Method, register_method


@register_method("tread")
class TREAD(RoutedNetwork, Method):
    """Routes r(i->j)@rate: blocks i..j see a random (or row-wise) subset of the tokens while training."""

    def rng_state(self):
        return self.generator.get_state()

    def set_rng_state(self, state) -> None:
        self.generator.set_state(state)

    def set_shard(self, rank: int, world: int) -> None:
        self.shard = (rank, world)

    def describe(self) -> str:
        return " ".join(map(str, self.routes)) or "none"

    def tokens_per_block(self, force_rate: Optional[float] = None) -> List[int]:
        bb = self.backbone
        (rows, cols), n = bb.grid_size, bb.num_tokens
        tokens = [n] * bb.depth
        for r in self.routes:
            rate = r.rate if force_rate is None else float(force_rate)
            kept = (rows - int(rows * rate)) * cols if self.selection == "rows" else n - int(n * rate)
            tokens[r.start:r.end + 1] = [kept] * (r.end + 1 - r.start)
        return tokens


__all__ = ["TREAD", "Route"]
