"""Backbone registry. Importing this package registers the built-in backbones."""
from .protocol import BlockStack, Grid
from .registry import ConfigError, backbone_sizes, build_backbone, list_backbones, register_backbone

from . import dit  # noqa: F401  (registers "dit")
from . import lightningdit  # noqa: F401  (registers "lightningdit")

for _optional in ("rwkv", "mamba"):
    try:
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as _err:  # module not written yet / optional dep missing
        if _err.name != f"{__name__}.{_optional}":
            raise

__all__ = ["BlockStack", "Grid", "ConfigError", "register_backbone", "build_backbone", "list_backbones", "backbone_sizes"]
