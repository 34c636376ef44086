"""Which tokens a route keeps. Every function returns kept ids in ascending (raster) order."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from tread_bench.core.devices import to_device
from tread_bench.core.errors import ConfigError

SELECTIONS = ("random", "rows")


def kept_count(n: int, rate: float) -> int:
    """How many of ``n`` tokens (or rows) a draw at ``rate`` keeps: n - floor(n * rate), the official TREAD router's
    count (rate 0.5 of 256 tokens keeps 128). Every method counts what it keeps with this."""
    return n - int(n * rate)


def kept_tokens(num_tokens: int, grid: Optional[Tuple[int, int]], rate: float, strategy: str) -> int:
    """Tokens a draw at ``rate`` keeps: whole rows of the grid under ``rows`` selection, single tokens otherwise."""
    if strategy == "rows":
        rows, cols = grid
        return kept_count(rows, rate) * cols
    return kept_count(num_tokens, rate)


def random_selection(batch: int, num_tokens: int, kept: int, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """Independent uniform subset per sample: (B, kept) kept ids, each row ascending."""
    noise = to_device(torch.rand(batch, num_tokens, generator=generator), device)
    return noise.argsort(dim=1)[:, :kept].sort(dim=1).values


def row_selection(batch: int, grid: Tuple[int, int], rate: float, generator: torch.Generator,
                  device: torch.device) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Keep whole rows of the (rows, cols) grid, chosen per sample, so the kept tokens form a
    (kept_rows, cols) grid in raster order. Returns (ids, kept_grid)."""
    rows, cols = grid
    kept_rows = kept_count(rows, rate)
    noise = to_device(torch.rand(batch, rows, generator=generator), device)
    row_ids = noise.argsort(dim=1)[:, :kept_rows].sort(dim=1).values  # (B, kept_rows)
    ids = (row_ids[:, :, None] * cols + torch.arange(cols, device=device)).reshape(batch, kept_rows * cols)
    return ids, (kept_rows, cols)


def select(strategy: str, batch: int, grid: Optional[Tuple[int, int]], num_tokens: int, rate: float,
           generator: torch.Generator, device: torch.device):
    """Dispatch on ``strategy``; returns (ids, grid of the kept tokens or None)."""
    if strategy == "random":
        return random_selection(batch, num_tokens, kept_count(num_tokens, rate), generator, device), None
    if strategy == "rows":
        if grid is None or grid[0] * grid[1] != num_tokens:
            raise ConfigError(
                f"row-wise selection needs tokens that form a grid, got {num_tokens} tokens and grid {grid}; "
                "use selection=random for this backbone"
            )
        return row_selection(batch, grid, rate, generator, device)
    raise ConfigError(f"unknown selection '{strategy}'; choose one of {', '.join(SELECTIONS)} or auto")
