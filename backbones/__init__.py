"""Backbone registry. Importing this package registers the built-in backbones."""
from .protocol import BlockStack, Grid
from .registry import backbone_module, backbone_sizes, build_backbone, list_backbones, register_backbone

from . import dit, lightningdit, mamba, rwkv  # noqa: F401  (each registers its backbone; mamba_ssm is imported lazily)
from .mamba import check_cuda_kernels

__all__ = ["BlockStack", "Grid", "register_backbone", "build_backbone", "list_backbones", "backbone_module",
           "backbone_sizes", "check_cuda_kernels"]
