"""TREAD (Krause et al., ICCV 2025) as a method plug-in: routing.RoutedNetwork behind the Method interface.

routing/ stays the backbone-agnostic routing library (routes, selection, the router); this file only
adapts it. Suite entry: ``{routes: [{start, end, rate}, ...], selection: auto|random|rows}`` (``kind:
tread`` is the default kind); no routes is the baseline (the full network).
"""
from __future__ import annotations

from typing import List, Optional

from routing import RoutedNetwork, Route
from routing.routes import parse_routes, validate_routes
from routing.selection import kept_tokens

from .registry import SeededMethod, register_method


@register_method("tread")
class TREAD(RoutedNetwork, SeededMethod):
    """Routes r(i->j)@rate: blocks i..j see a random (or row-wise) subset of the tokens while training."""

    #: a schedule may change the routes (another rate, other blocks, or [] for unrouted training)
    schedulable = ("routes",)

    def apply_settings(self, **settings) -> None:
        self.refuse_unschedulable(settings)
        if "routes" in settings:
            bb = self.backbone
            routes = parse_routes(settings["routes"], bb.depth)  # as the constructor checks them
            validate_routes(routes, bb.depth, bb.num_tokens)
            self.routes = routes

    def describe(self) -> str:
        return " ".join(map(str, self.routes)) or "none"

    def tokens_per_block(self, force_rate: Optional[float] = None) -> List[int]:
        bb = self.backbone
        tokens = [bb.num_tokens] * bb.depth
        # a forced rate goes through active_routes, which refuses one the routes cannot run (no routes, >= 1)
        for r in self.routes if force_rate is None else self.active_routes(force_rate):
            kept = kept_tokens(bb.num_tokens, bb.grid_size, r.rate, self.selection)
            tokens[r.start:r.end + 1] = [kept] * (r.end + 1 - r.start)
        return tokens


__all__ = ["TREAD", "Route"]
