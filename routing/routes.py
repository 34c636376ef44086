"""Routes r(i->j): which blocks run on a subset of tokens, and how many tokens skip them."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Sequence, Tuple

from tread_bench.core.errors import ConfigError

from .selection import kept_count

# The paper's notation: "2->8@0.5", "r(2->8)@0.5", a negative end counted from the top ("2->-4@0.5").
_NOTATION = re.compile(r"^\s*(?:r\(\s*(-?\d+)\s*->\s*(-?\d+)\s*\)|(-?\d+)\s*->\s*(-?\d+))\s*@\s*(\S+)\s*$")
HOW = 'write it as {start: 2, end: 8, rate: 0.5} or "2->8@0.5"'


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

    def kept(self, n: int) -> int:
        """Tokens of ``n`` the route's blocks run on (routing.selection.kept_count)."""
        return kept_count(n, self.rate)


def show_route(item) -> str:
    """A route entry as the user wrote it, for error messages."""
    if isinstance(item, Mapping):
        return "{" + ", ".join(f"{k}: {v}" for k, v in item.items()) + "}"
    return str(item)


def route_fields(item) -> Tuple[int, int, float]:
    """(start, end, rate) of one route entry: a Route, a mapping ``{start: 2, end: 8, rate: 0.5}``, or a
    string in the paper's notation ``"2->8@0.5"`` / ``"r(2->8)@0.5"`` (``end`` may be negative:
    ``"2->-4@0.5"``). Anything else is a ConfigError saying how to write it. Ranges are checked later,
    against the backbone's depth (validate_routes)."""
    if isinstance(item, Route):
        return item.start, item.end, item.rate
    if isinstance(item, str):
        m = _NOTATION.match(item)
        if m is None:
            why = "no rate; " if "@" not in item and _NOTATION.match(item + "@0") else ""
            raise ConfigError(f"route '{item}': {why}{HOW}")
        start, end = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        fields, shown = {"start": start, "end": end, "rate": m.group(5)}, f"'{item}'"
    elif isinstance(item, Mapping):
        missing = [k for k in ("start", "end", "rate") if k not in item]
        extra = sorted(set(map(str, item)) - {"start", "end", "rate"})
        if missing or extra:
            what = f"is missing {missing}" if missing else f"has unknown keys {extra}"
            raise ConfigError(f"route {show_route(item)} {what}; {HOW}")
        fields, shown = dict(item), show_route(item)
    else:
        raise ConfigError(f"route '{item}': {HOW}")
    values = []
    for key, convert, what in (("start", _integer, "a block index"), ("end", _integer, "a block index"),
                               ("rate", _number, "a number")):
        try:
            values.append(convert(fields[key]))
        except (TypeError, ValueError):
            raise ConfigError(f"route {shown}: {key} '{fields[key]}' is not {what}; {HOW}") from None
    start, end, rate = values
    return start, end, rate


def _integer(value) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)


def _number(value) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)


def parse_routes(spec: Iterable[Mapping | Route | str] | None, depth: int) -> List[Route]:
    """Build and validate routes for a backbone of ``depth`` blocks.

    Each entry is a Route, a mapping with ``start``, ``end``, ``rate``, or a string in the paper's
    notation (``"2->8@0.5"``, ``"r(2->8)@0.5"``). A negative ``end`` counts from the top like a Python
    index (``end: -4`` or ``"2->-4@0.5"`` with depth 12 is block 8), so one config states the paper's
    rule i=2, j=depth-4 for every model size.
    """
    if isinstance(spec, (str, Mapping)):
        raise ConfigError(f"routes must be a list of routes, got {show_route(spec)}; e.g. routes: [\"2->8@0.5\"]")
    routes: List[Route] = []
    for item in spec or []:
        start, end, rate = route_fields(item)
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
        if num_tokens is not None and route.kept(num_tokens) < 1:
            raise ConfigError(f"route {route}: keeps no token out of {num_tokens}; lower the rate")
        if previous is not None and route.start <= previous.end:
            raise ConfigError(
                f"routes {previous} and {route} overlap or are out of order; list routes in order with start > previous end"
            )
        previous = route
