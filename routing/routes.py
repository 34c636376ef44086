"""Routes r(i->j): which blocks run on a subset of tokens, and how many tokens skip them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Mapping, Sequence

from backbones.registry import ConfigError


@dataclass(frozen=True)
class Route:
    """Tokens are taken out before block ``start`` and written back after block ``end`` (inclusive).

    ``rate`` is the selection rate: the fraction of tokens ROUTED past the blocks (0 = no routing).
    """

    start: int
    end: int
    rate: float

    def __str__(self) -> str:
        return f"r({self.start}->{self.end})@{self.rate:g}"

    def num_routed(self, n: int) -> int:
        # floor, as the official implementation: rate 0.5 of 256 tokens routes 128.
        return int(n * self.rate)


def parse_routes(spec: Iterable[Mapping | Route] | None, depth: int) -> List[Route]:
    """Build and validate routes for a backbone of ``depth`` blocks.

    Each entry is a Route or a mapping with ``start``, ``end``, ``rate``. A negative ``end``
    counts from the top like a Python index (``end: -4`` with depth 12 is block 8), so one
    config states the paper's rule i=2, j=depth-4 for every model size.
    """
    routes: List[Route] = []
    for k, item in enumerate(spec or []):
        if isinstance(item, Route):
            start, end, rate = item.start, item.end, item.rate
        else:
            missing = {"start", "end", "rate"} - set(item)
            if missing:
                raise ConfigError(f"route {k} is missing {sorted(missing)}; write it as {{start: 2, end: 8, rate: 0.5}}")
            start, end, rate = int(item["start"]), int(item["end"]), float(item["rate"])
        if end < 0:
            end += depth
        routes.append(Route(start, end, rate))
    validate_routes(routes, depth)
    return routes


def validate_routes(routes: Sequence[Route], depth: int, num_tokens: int | None = None) -> None:
    previous = None
    for route in routes:
        if not 0 <= route.start < depth:
            raise ConfigError(f"route {route}: start must be a block index in [0, {depth - 1}] for a {depth}-block backbone")
        if route.end < route.start:
            raise ConfigError(f"route {route}: end must be >= start (blocks start..end run on the kept tokens)")
        if route.end >= depth:
            raise ConfigError(f"route {route}: end {route.end} is beyond the last block {depth - 1}; use end <= {depth - 1}")
        if not 0.0 <= route.rate < 1.0:
            raise ConfigError(f"route {route}: rate {route.rate} must be in [0, 1) (it is the fraction of tokens routed)")
        if num_tokens is not None and num_tokens - route.num_routed(num_tokens) < 1:
            raise ConfigError(f"route {route}: keeps no token out of {num_tokens}; lower the rate")
        if previous is not None and route.start <= previous.end:
            raise ConfigError(
                f"routes {previous} and {route} overlap or are out of order; list routes in order with start > previous end"
            )
        previous = route
