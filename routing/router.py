"""Drive any BlockStack with token routes.

The router owns nothing of the backbone's internals: it calls ``embed``, each block in order,
and ``head`` (see backbones/protocol.py), and between blocks it gathers and scatters tokens.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from backbones.protocol import BlockStack, embed_tokens, full_positions
from tread_bench.core.errors import ConfigError

from .routes import Route, parse_routes, validate_routes
from .selection import SELECTIONS, select


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(saved: torch.Tensor, ids: torch.Tensor, processed: torch.Tensor) -> torch.Tensor:
    """Write ``processed`` back into the positions ``ids`` of ``saved``; out of place, so the
    routed positions keep exactly the representation they had before the route started."""
    return saved.scatter(1, ids.unsqueeze(-1).expand(-1, -1, saved.shape[-1]), processed.to(saved.dtype))


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class RoutedNetwork(nn.Module):
    """``net(x, noise_labels, class_labels) -> output`` with TREAD routes applied while training.

    Args:
        backbone: any registered BlockStack.
        routes: list of Route or {start, end, rate} mappings (validated against the backbone).
        selection: "random", "rows" or "auto" (rows for scan-mixing backbones, random otherwise).
        fp32_after_route: run the block right after each route end with autocast disabled
            (paper A.2: keeps bf16 training stable when few blocks follow a route).
        seed: seed of the selection generator (a CPU generator: the same ids on every device).
    """

    def __init__(self, backbone: BlockStack, routes: Sequence = (), selection: str = "auto",
                 fp32_after_route: bool = True, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.routes: List[Route] = parse_routes(routes, backbone.depth)
        validate_routes(self.routes, backbone.depth, backbone.num_tokens)
        if selection == "auto":
            selection = "rows" if backbone.scan_mixing else "random"
        if selection not in SELECTIONS:
            raise ConfigError(f"unknown selection '{selection}'; choose one of {', '.join(SELECTIONS)} or auto")
        self.selection = selection
        self.fp32_after_route = fp32_after_route
        self.generator = torch.Generator().manual_seed(seed)
        # Data-parallel shard (rank, world): selection noise is drawn for the global batch and
        # sliced, so a run's routing does not depend on how many processes share it.
        self.shard = (0, 1)

    @property
    def blocks(self) -> nn.ModuleList:
        """The backbone's blocks (where FLOP counting hooks in)."""
        return self.backbone.blocks

    def extra_repr(self) -> str:
        return f"routes=[{', '.join(map(str, self.routes))}], selection={self.selection}"

    def active_routes(self, force_rate: Optional[float]) -> List[Route]:
        if force_rate is not None:
            if not self.routes:
                raise ConfigError("routing was forced but this model has no routes; configure routes to force them")
            forced = [Route(r.start, r.end, float(force_rate)) for r in self.routes]
            validate_routes(forced, self.backbone.depth, self.backbone.num_tokens)
            return forced
        return self.routes if self.training else []

    def _select(self, batch: int, grid, num_tokens: int, rate: float, device):
        rank, world = self.shard
        ids, kept_grid = select(self.selection, batch * world, grid, num_tokens, rate, self.generator, device)
        return ids[rank * batch:(rank + 1) * batch], kept_grid

    def forward(self, x, noise_labels, class_labels, force_rate: Optional[float] = None,
                return_token_masks: bool = False):
        """Run the backbone; routes apply in training mode, or at any mode when ``force_rate`` is set.

        With ``return_token_masks`` also returns, per active route, a (B, rows, cols) bool mask of
        the tokens the route's blocks processed (for the route-aware loss).
        """
        bb = self.backbone
        tokens, cond = embed_tokens(bb, x, noise_labels, class_labels)
        routes = [r for r in self.active_routes(force_rate) if r.rate > 0]
        starts = {r.start: r for r in routes}
        ends = {r.end for r in routes}
        grid, full_grid = bb.grid_size, bb.grid_size
        # Each block also gets the positions (indices in the full grid) of the tokens it holds:
        # all of them outside a route, the kept ids inside one.
        positions = all_positions = full_positions(tokens.shape[0], tokens.shape[1], tokens.device)
        masks, saved, ids, fp32_next = [], None, None, False
        for idx, block in enumerate(bb.blocks):
            if idx in starts:
                saved = tokens
                ids, grid = self._select(tokens.shape[0], full_grid, tokens.shape[1], starts[idx].rate, tokens.device)
                tokens, positions = gather_tokens(tokens, ids), ids
                if return_token_masks:
                    mask = torch.zeros(saved.shape[:2], dtype=torch.bool, device=saved.device)
                    masks.append(mask.scatter_(1, ids, True).view(-1, *full_grid))
            if fp32_next and tokens.device.type != "meta":  # meta (FLOP counting) has no autocast
                with torch.autocast(device_type=tokens.device.type, enabled=False):
                    tokens = block(_at_least_fp32(tokens), _at_least_fp32(cond), grid, positions)
                fp32_next = False
            else:
                tokens = block(tokens, cond, grid, positions)
            if idx in ends:
                tokens = scatter_tokens(saved, ids, tokens)
                grid, positions, saved, ids = full_grid, all_positions, None, None
                fp32_next = self.fp32_after_route and idx + 1 < bb.depth
        out = bb.head(tokens, cond)
        return (out, masks) if return_token_masks else out
