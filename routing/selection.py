"""Which tokens a route keeps. Every function returns kept ids in ascending (raster) order."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from tread_bench.core.devices import to_device
from tread_bench.core.errors import ConfigError

SELECTIONS = ("random", "rows")


def random_selection(batch: int, num_tokens: int, num_routed: int, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """Independent uniform subset per sample: (B, N - num_routed) kept ids, each row ascending."""
    noise = to_device(torch.rand(batch, num_tokens, generator=generator), device)
    keep = num_tokens - num_routed
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def row_selection(batch: int, grid: Tuple[int, int], rate: float, generator: torch.Generator,
                  device: torch.device) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Keep whole rows of the (rows, cols) grid, chosen per sample, so the kept tokens form a
    (kept_rows, cols) grid in raster order. Returns (ids, kept_grid)."""
    rows, cols = grid
    kept_rows = rows - int(rows * rate)
    noise = to_device(torch.rand(batch, rows, generator=generator), device)
    row_ids = noise.argsort(dim=1)[:, :kept_rows].sort(dim=1).values  # (B, kept_rows)
    ids = (row_ids[:, :, None] * cols + torch.arange(cols, device=device)).reshape(batch, kept_rows * cols)
    return ids, (kept_rows, cols)


def select(strategy: str, batch: int, grid: Optional[Tuple[int, int]], num_tokens: int, rate: float,
           generator: torch.Generator, device: torch.device):
    """Dispatch on ``strategy``; returns (ids, grid of the kept tokens or None)."""
    if strategy == "random":
        return random_selection(batch, num_tokens, int(num_tokens * rate), generator, device), None
    if strategy == "rows":
        if grid is None or grid[0] * grid[1] != num_tokens:
            raise ConfigError(
                f"row-wise selection needs tokens that form a grid, got {num_tokens} tokens and grid {grid}; "
                "use selection=random for this backbone"
            )
        return row_selection(batch, grid, rate, generator, device)
    raise ConfigError(f"unknown selection '{strategy}'; choose one of {', '.join(SELECTIONS)} or auto")
