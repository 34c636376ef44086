"""Datasets as in-memory tensors: images (N, C, H, W) float in [-1, 1] (or latents), labels (N,) int64."""
from .datasets import DATASETS, ImageSet, load_dataset

__all__ = ["DATASETS", "ImageSet", "load_dataset"]
