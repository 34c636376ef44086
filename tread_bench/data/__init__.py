"""Datasets: images (N, C, H, W) float in [-1, 1] as in-memory tensors, or latents read from disk per batch; labels (N,) int64."""
from .datasets import DATASETS, ImageSet, load_dataset

__all__ = ["DATASETS", "ImageSet", "load_dataset"]
