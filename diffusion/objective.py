"""Training objectives as plug-ins (in the style of SiT's transport/: the objective is an object the loop calls).

An objective owns everything that differs between diffusion formulations: how a network is wrapped
(preconditioning), the random draws of a training step, the per-sample loss, the fixed levels of the
held-out evaluation loss, and the sampler. The training loop, the throughput step and evaluation call
only this interface. Adding one is one file with ``@register_objective("name")`` plus
``suites/objective/<name>.yaml``.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import nn
from torch.nn import functional as F

from tread_bench.core.errors import ConfigError
from tread_bench.core.registry import Registry


class Objective:
    """The interface; see diffusion/edm.py and diffusion/flow.py for the two implementations."""

    name: str = ""
    #: what the held-out loss levels are, in column names: eval_loss_<level_symbol><value>
    level_symbol: str = "level"

    def wrap(self, net: nn.Module) -> nn.Module:
        """The model the loop trains and samples: ``model(x, level, labels, **method_kwargs)``; ``model.net`` is
        the method network."""
        raise NotImplementedError

    def draw(self, batch: int, shape, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """One training step's random draws for ``batch`` samples of ``shape``, on the CPU from ``generator``
        (drawn for the global batch and sliced per process: results do not depend on the process count).
        Every value has the batch as its first dimension."""
        raise NotImplementedError

    def loss(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, draws: Dict[str, torch.Tensor],
             route_aware: bool = False) -> torch.Tensor:
        """Per-sample loss, shape (B,). The model is called with ``return_loss_terms=True`` (or, when
        ``route_aware``, ``return_token_masks=True``): a method that shapes its loss returns a
        tread_bench.methods.registry.LossTerms, applied as ``terms.apply(err, prediction, noisy)`` to the objective's
        per-pixel error, its prediction and the noisy network input; otherwise the loss is the plain mean."""
        raise NotImplementedError

    def eval_levels(self, count: int) -> torch.Tensor:
        """(count,) float64 fixed levels of the held-out loss: equal-probability bins of the training draws."""
        raise NotImplementedError

    def level_draws(self, level: torch.Tensor, noise: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The draws of a held-out evaluation at one fixed ``level`` with fixed ``noise``."""
        raise NotImplementedError

    def sample(self, model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, sampler, null_label: int,
               progress: bool = False) -> torch.Tensor:
        """Samples (float64) from N(0, I) ``noise`` by the objective's ODE solver; ``sampler`` is a
        diffusion.sampler.SamplerConfig (steps, cfg_scale, sparse_guidance, route_rate)."""
        raise NotImplementedError

    def nfe(self, steps: int) -> int:
        """Network evaluations per sample (per guidance pass) of a ``steps``-step sampler."""
        raise NotImplementedError

    def sampler_name(self) -> str:
        """The sampler, as result rows record it."""
        raise NotImplementedError


_REGISTRY: Registry[Callable[..., Objective]] = Registry("objective", "objectives")


def register_objective(name: str):
    return _REGISTRY.decorator(name)


def list_objectives() -> List[str]:
    return _REGISTRY.names()


def build_objective(name: str = "edm", **kwargs) -> Objective:
    """The objective ``name`` with its keyword arguments (the keys of ``suites/objective/<name>.yaml``)."""
    factory = _REGISTRY[name]
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise ConfigError(f"objective '{name}' rejected its arguments ({err}); check objective.*") from err


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 when it is half precision: losses and skip connections run in fp32 under bf16 autocast,
    never below the input's precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def route_mean(err: torch.Tensor, masks) -> torch.Tensor:
    """Per-sample mean of the (B, C, H, W) error ``err``: over all pixels when ``masks`` is empty, else over
    the pixels of the tokens each route processed, averaged over routes (the v1 route-aware loss)."""
    if not masks:
        return err.mean(dim=(1, 2, 3))
    per_route = []
    for mask in masks:  # token mask (B, rows, cols) -> pixel mask by nearest upsampling
        pix = F.interpolate(mask[:, None].float(), size=err.shape[-2:], mode="nearest")
        per_route.append((err * pix).sum(dim=(1, 2, 3)) / (pix.sum(dim=(1, 2, 3)) * err.shape[1]))
    return torch.stack(per_route).mean(dim=0)
