"""Token-reduction methods as plug-ins: the interface every caller uses, and a decorator registry.

A method wraps a backbone (any :class:`~backbones.BlockStack`) and decides which tokens each block
sees. The trainer, FLOP counter, throughput step, sampler and guidance code call only the
:class:`Method` interface below, never a method's internals; adding a method is one file with a
``@register_method("kind")`` class plus the suite YAML that names the kind.
"""
from __future__ import annotations

import inspect
from typing import Callable, List, Optional

import torch
from torch import nn

from backbones import build_backbone
from backbones.protocol import BlockStack
from core.errors import ConfigError
from core.registry import Registry


class Method(nn.Module):
    """The interface of a token-reduction method (an ``nn.Module`` around ``self.backbone``).

    Subclasses implement ``forward`` and override what applies to them; the defaults describe a
    method that reduces nothing and draws nothing at random.
    """

    backbone: BlockStack
    #: how the method picks the tokens it keeps (a table column): "random", "rows", ... or "none"
    selection: str = "none"

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor,
                force_rate: Optional[float] = None, return_token_masks: bool = False):
        """The network output (same shape as ``x``). Tokens are reduced in training mode, or in any mode
        at ``force_rate`` (selection-rate guidance, routed FLOP counts). With ``return_token_masks`` also
        returns a list of (B, rows, cols) bool masks of the tokens reduced blocks processed (the
        route-aware loss; empty when nothing was reduced)."""
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        """The backbone's blocks: where FLOP counting hooks in and ``compile_blocks`` compiles."""
        return self.backbone.blocks

    def rng_state(self):
        """The state of the method's own random draws (saved in checkpoints); None if it draws nothing."""
        return None

    def set_rng_state(self, state) -> None:
        """Restore what :meth:`rng_state` returned: the resumed run draws what the uninterrupted one did."""

    def set_shard(self, rank: int, world: int) -> None:
        """This process's slice of the global batch: draw for all ``world`` slices, keep slice ``rank``,
        so a run's draws do not depend on the number of processes."""

    def describe(self) -> str:
        """Where tokens are reduced, for tables (the ``routes`` column), e.g. ``r(2->8)@0.5``; "none"."""
        return "none"

    def tokens_per_block(self, force_rate: Optional[float] = None) -> List[int]:
        """Tokens each block sees in a training forward (or any forward at ``force_rate``). The FLOP
        counter checks this against what the blocks really received."""
        return [self.backbone.num_tokens] * self.backbone.depth


_REGISTRY: Registry[Callable[..., Method]] = Registry("method kind", "kinds")


def register_method(kind: str):
    """Register a :class:`Method` factory under ``kind``. It is called as ``factory(backbone, **args)``:
    ``args`` are the suite entry's keys (all but ``kind`` and ``backbones``), plus the run's ``seed``
    and ``fp32_after_route`` when the factory names them."""

    return _REGISTRY.decorator(kind)


def list_methods() -> List[str]:
    return _REGISTRY.names()


def build_method(kind: str, backbone: BlockStack, **kwargs) -> Method:
    """``kind``'s method around ``backbone``; unknown kinds and rejected arguments are ConfigErrors."""
    factory = _REGISTRY[kind]
    try:
        method = factory(backbone, **kwargs)
    except TypeError as err:
        raise ConfigError(f"method kind '{kind}' rejected its arguments ({err}); check the suite's method entry") from err
    if not isinstance(method, Method):
        raise ConfigError(f"method kind '{kind}' must build a methods.Method, got {type(method).__name__}")
    return method


def build_network(backbone: str, size: Optional[str], data_shape, num_classes: int, kind: str = "tread",
                  seed: int = 0, fp32_after_route: bool = True, overrides: Optional[dict] = None,
                  **method_args) -> Method:
    """THE network of a run: backbone ``backbone`` at ``size`` for ``data_shape`` (C, H, W) images, inside
    method ``kind``. Validation (on the meta device), training, FLOP counting and throughput all build
    through this function; an objective then wraps the result (``objective.wrap(net)``).

    ``seed`` and ``fp32_after_route`` reach the method only if its factory names them."""
    channels, height, width = data_shape
    if height != width:
        raise ConfigError(f"square inputs only; got {height}x{width}")
    bb = build_backbone(backbone, size, input_size=height, in_channels=channels, num_classes=num_classes,
                        **(overrides or {}))
    factory = _REGISTRY.get(kind)
    if factory is not None:
        names = inspect.signature(factory).parameters
        run_level = {"seed": seed, "fp32_after_route": fp32_after_route}
        method_args = {**{k: v for k, v in run_level.items() if k in names}, **method_args}
    return build_method(kind, bb, **method_args)
