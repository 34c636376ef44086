"""Host-to-device copies that do not make the host wait, so a training step queues its work without a sync."""
from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` (on the host) on ``device`` without blocking: on CUDA staged through pinned memory and copied
    ``non_blocking`` (the caching host allocator keeps the staging buffer alive until the copy ends); elsewhere a
    plain move."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, non_blocking=True)
