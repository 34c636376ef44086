"""The precision rule, in one place: what ``precision: auto`` means and how each precision is run."""
from __future__ import annotations

from typing import Optional

import torch

from tread_bench.core.errors import ConfigError

#: what a suite may ask for ("no" is accelerate's name for fp32)
PRECISIONS = ("auto", "fp32", "no", "bf16", "fp16")


def resolve_precision(requested: str, device: str) -> str:
    """"fp32", "bf16" or "fp16" for a run on ``device``: auto = bf16 autocast on CUDA, fp32 elsewhere."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision = {requested}: use one of auto, fp32, bf16, fp16")
    if requested == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return "fp32" if requested == "no" else requested


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a resolved precision (None: fp32, no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def mixed_precision_name(precision: str) -> str:
    """accelerate's ``mixed_precision`` value for a resolved precision."""
    return "no" if precision == "fp32" else precision
