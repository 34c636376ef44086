"""The precision rule, in one place: what ``precision: auto`` means, how each precision is run, TF32 and when blocks
are compiled."""
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


def set_tf32(enabled: bool, device) -> bool:
    """TF32 for fp32 matmuls and convolutions on CUDA (fp32 runs, and the fp32 block after a route end, which keeps
    fp32 storage and accumulation): about 8x the IEEE fp32 rate on Ampere and later, and what DiT-family training
    sets. Without it that block alone would eat much of TREAD's speedup. Returns whether TF32 is on; on other
    devices nothing changes and it is False."""
    if torch.device(device).type != "cuda":
        return False
    value = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = value
    torch.backends.cudnn.conv.fp32_precision = value
    return bool(enabled)


def compile_blocks_on(setting, device) -> bool:
    """``compile_blocks``: ``auto`` compiles on CUDA (where fusing the element-wise work around each block pays)
    and not on CPU (where compiling costs more than a short run saves); true / false as written."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ConfigError(f"compile_blocks = {setting!r}: use auto, true or false")
