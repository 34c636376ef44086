"""Training checkpoints, written atomically (core.io: a kill at any moment leaves the old file or the new one).

``atomic_write`` and ``atomic_write_text`` are re-exported from core.io for older imports.
"""
from __future__ import annotations

import torch

from core.io import atomic_write, atomic_write_text

__all__ = ["atomic_write", "atomic_write_text", "save_checkpoint", "load_checkpoint"]


def save_checkpoint(path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
