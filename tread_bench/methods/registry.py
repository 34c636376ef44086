"""Token-reduction methods as plug-ins: the interface every caller uses, and a decorator registry.

A method wraps a backbone (any :class:`~backbones.BlockStack`) and decides which tokens each block
sees. The trainer, FLOP counter, throughput step, sampler and guidance code call only the
:class:`Method` interface below, never a method's internals; adding a method is one file with a
``@register_method("kind")`` class plus the suite YAML that names the kind.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from backbones import build_backbone
from backbones.protocol import BlockStack
from tread_bench.core.errors import ConfigError
from tread_bench.core.registry import Registry


@dataclass
class LossTerms:
    """How a method shapes the objective's per-sample training loss, for one forward.

    A method whose training loss is not the objective's plain loss (MaskDiT, drop-and-discard) sets
    ``Method.shapes_loss = True``; its forward then accepts ``return_loss_terms=True`` and returns
    ``(out, terms)``, ``terms`` a LossTerms or None (None: the plain loss, e.g. nothing was dropped).
    The objective stays generic: it computes its per-pixel error ``err`` (B, C, H, W) of ``prediction``
    (what the network output became: EDM's denoised image, flow's velocity) against its target, and
    calls ``terms.apply(err, prediction, noisy)`` with ``noisy`` the noisy sample it fed the network.

    ``token_weights`` (B, rows, cols), >= 0, weights the main term: the per-sample loss is the weighted
    mean of the per-token errors (the mean of ``err`` over a token's pixels and channels), so a 0/1 mask
    takes the loss on the tokens it marks only. None: the plain mean over all pixels. Subclasses add an
    auxiliary per-sample term by overriding :meth:`auxiliary` (MaskDiT's MAE reconstruction).
    """

    token_weights: Optional[torch.Tensor] = None

    def main(self, err: torch.Tensor) -> torch.Tensor:
        """(B,) main term: the token-weighted mean of ``err``."""
        if self.token_weights is None:
            return err.mean(dim=(1, 2, 3))
        rows, cols = self.token_weights.shape[-2:]
        # each token's mean error over its patch of pixels and all channels (the official MaskDiT order)
        per_token = F.avg_pool2d(err.mean(dim=1), (err.shape[-2] // rows, err.shape[-1] // cols))
        weights = self.token_weights.to(per_token.dtype)
        return (per_token * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2))

    def auxiliary(self, prediction: torch.Tensor, noisy: torch.Tensor) -> Optional[torch.Tensor]:
        """(B,) term added to the main one, or None."""
        return None

    def apply(self, err: torch.Tensor, prediction: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """The per-sample loss (B,): main term plus the auxiliary one."""
        loss = self.main(err)
        extra = self.auxiliary(prediction, noisy)
        return loss if extra is None else loss + extra


class Method(nn.Module):
    """The interface of a token-reduction method (an ``nn.Module`` around ``self.backbone``).

    Subclasses implement ``forward`` and override what applies to them; the defaults describe a
    method that reduces nothing and draws nothing at random.
    """

    backbone: BlockStack
    #: how the method picks the tokens it keeps (a table column): "random", "rows", ... or "none"
    selection: str = "none"
    #: True when the method shapes its training loss: forward then accepts ``return_loss_terms`` (LossTerms)
    shapes_loss: bool = False
    #: the settings :meth:`apply_settings` may change during a run (a suite entry's ``schedule``); none by default
    schedulable: tuple = ()

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor,
                force_rate: Optional[float] = None, return_token_masks: bool = False):
        """The network output (same shape as ``x``). Tokens are reduced in training mode, or in any mode
        at ``force_rate`` (Sparse Guidance, routed FLOP counts). With ``return_token_masks`` also
        returns a list of (B, rows, cols) bool masks of the tokens reduced blocks processed (the
        route-aware loss; empty when nothing was reduced). A method with ``shapes_loss`` also takes
        ``return_loss_terms=True`` and then returns ``(out, LossTerms or None)`` (the objectives ask for it
        on every loss evaluation; see :class:`LossTerms`)."""
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        """The backbone's blocks: where FLOP counting hooks in and ``compile_blocks`` compiles."""
        return self.backbone.blocks

    def method_blocks(self) -> List[nn.Module]:
        """Blocks the method adds beyond the backbone's (MaskDiT's decoder): the memory plan counts the activations
        they save as it counts the backbone blocks'. Layers that are not blocks (a fusion linear) are left out."""
        return []

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

    def apply_settings(self, **settings) -> None:
        """Change method settings in the middle of a run: a suite entry's ``schedule`` (e.g. MaskDiT's unmasked
        fine-tune, ``mask_ratio: 0``). The trainer calls it when a stage begins, and again after a resume past
        the stage's first step, so the network afterwards must be the one the factory would build with those
        settings (same parameters, same forward). Only names in :attr:`schedulable` are accepted; a setting that
        would add or remove parameters does not belong there. Bad values are ConfigErrors (one line), and
        nothing changes unless every value is good. The default refuses every setting."""
        self.refuse_unschedulable(settings)
        if settings:  # a subclass that lists schedulable settings must apply them itself
            raise NotImplementedError(f"{type(self).__name__} lists schedulable settings but does not apply them")

    def refuse_unschedulable(self, settings) -> None:
        """ConfigError (one line) for any name of ``settings`` that is not in :attr:`schedulable`."""
        unknown = [name for name in settings if name not in self.schedulable]
        if unknown:
            can = (f"its schedule may change: {', '.join(self.schedulable)}" if self.schedulable
                   else "it has no settings a schedule can change")
            raise ConfigError(f"method {method_kind(self)} cannot change {', '.join(map(str, unknown))} during a run; "
                              f"{can}")


class SeededMethod(Method):
    """A method whose random draws come from ``self.generator`` (a CPU ``torch.Generator``, so every device
    draws the same ids) for the global batch, of which it keeps slice ``self.shard = (rank, world)``: the
    checkpointed state and the process shard of the interface, written once for TREAD, MaskDiT, drop and SPRINT."""

    generator: torch.Generator
    shard: tuple = (0, 1)

    def rng_state(self):
        return self.generator.get_state()

    def set_rng_state(self, state) -> None:
        self.generator.set_state(state)

    def set_shard(self, rank: int, world: int) -> None:
        self.shard = (rank, world)


_REGISTRY: Registry[Callable[..., Method]] = Registry("method kind", "kinds")

#: the kind of a suite's method entry that names none (``baseline: {routes: []}`` is TREAD without routes)
DEFAULT_KIND = "tread"


def register_method(kind: str):
    """Register a :class:`Method` factory under ``kind``. It is called as ``factory(backbone, **args)``:
    ``args`` are the suite entry's keys (all but ``kind``, ``backbones`` and ``schedule``), plus the run's ``seed``
    and ``fp32_after_route`` when the factory names them."""

    return _REGISTRY.decorator(kind)


def list_methods() -> List[str]:
    return _REGISTRY.names()


def method_kind(method: Method) -> str:
    """The registered kind of ``method`` (its class's registry name), else its class name."""
    for kind in _REGISTRY.names():
        if _REGISTRY.get(kind) is type(method):
            return kind
    return type(method).__name__


#: arguments a run gives a method factory itself, never its suite entry
RUN_LEVEL_ARGUMENTS = ("seed", "fp32_after_route")


def method_module(kind: str) -> Optional[str]:
    """The module that registered method ``kind`` (its factory's), or None when it is not registered."""
    factory = _REGISTRY.get(kind)
    return None if factory is None else factory.__module__


def method_arguments(kind: str) -> Optional[List[str]]:
    """The keyword arguments registered method ``kind`` takes from its suite entry, or None when it accepts any
    (its factory takes ``**kwargs``, or ``kind`` is not registered: build_network reports that)."""
    factory = _REGISTRY.get(kind)
    if factory is None:
        return None
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    given = {"self", "backbone", *RUN_LEVEL_ARGUMENTS}
    return [n for n, p in params.items() if n not in given and p.kind is not inspect.Parameter.VAR_POSITIONAL]


def schedulable_settings(kind: str) -> Optional[tuple]:
    """The settings a schedule may change for registered ``kind`` (its class's ``schedulable``), or None when
    the kind is not registered or its factory is not a Method class (then the built network checks them)."""
    factory = _REGISTRY.get(kind)
    if isinstance(factory, type) and issubclass(factory, Method):
        return tuple(factory.schedulable)
    return None


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


def build_network(backbone: str, size: Optional[str], data_shape, num_classes: int, kind: str = DEFAULT_KIND,
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
        run_level = dict(zip(RUN_LEVEL_ARGUMENTS, (seed, fp32_after_route)))
        method_args = {**{k: v for k, v in run_level.items() if k in names}, **method_args}
    return build_method(kind, bb, **method_args)
