"""The images a suite trains on, as every dataset loader returns them."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSet:
    """``images`` is an (N, C, H, W) float32 tensor (small sets) or, for latents, a
    :class:`tread_bench.data.latents.ShardedLatents` view that reads rows from disk when indexed (``images[idx]``,
    ``images[a:b]``: float32 tensors); ``labels`` is always in memory."""
    images: torch.Tensor  # (N, C, H, W) float32, or a ShardedLatents view
    labels: torch.Tensor  # (N,) int64
    num_classes: int
    name: str

    @property
    def shape(self):
        return tuple(self.images.shape[1:])

    def __len__(self):
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.images, torch.Tensor)

    def head(self, n: int) -> "ImageSet":
        """The first ``n`` images (a view stays out of core)."""
        images = self.images[:n] if self.in_memory else self.images.head(n)
        return ImageSet(images, self.labels[:n], self.num_classes, self.name)
