"""EDM (Karras et al. 2022): noise distribution, preconditioning and loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class EDMConfig:
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5


def precond_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning at noise level ``sigma``."""
    sd2, s2 = sigma_data ** 2, sigma ** 2
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / (s2 + sd2).sqrt()
    c_in = 1 / (s2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


class EDMDenoiser(nn.Module):
    """D(x; sigma, y) = c_skip x + c_out F(c_in x; c_noise, y) around a network F.

    Extra keyword arguments (e.g. ``force_rate``) pass through to F unchanged. ``return_loss_terms=True``
    returns ``(denoised, terms)``: the method's LossTerms when F shapes its loss (``F.shapes_loss``, see
    methods.registry.LossTerms), else None (the plain loss).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x, sigma, class_labels, return_loss_terms=False, **net_kwargs):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in precond_coefficients(sigma, self.sigma_data))
        if return_loss_terms and getattr(self.net, "shapes_loss", False):  # only such methods take the flag
            net_kwargs["return_loss_terms"] = True
        result = self.net((c_in * x).to(x.dtype), c_noise.flatten(), class_labels, **net_kwargs)
        out, extra = (result if isinstance(result, tuple) else (result, None))
        denoised = c_skip * x + c_out * _at_least_fp32(out)
        return (denoised, extra) if extra is not None or return_loss_terms else denoised


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    # the loss and the skip connection run in fp32 under bf16 autocast, but never below the input precision
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def sample_sigma(batch: int, cfg: EDMConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """log-normal training noise levels, drawn on the CPU (device independent, reproducible)."""
    return (torch.randn(batch, generator=generator) * cfg.P_std + cfg.P_mean).exp()


def edm_loss(denoiser: EDMDenoiser, x: torch.Tensor, class_labels: torch.Tensor, sigma: torch.Tensor,
             noise: torch.Tensor, route_aware: bool = False) -> torch.Tensor:
    """Per-sample weighted denoising loss, shape (B,).

    ``route_aware`` (paper v1): the loss is taken only over pixels of tokens each route processed,
    averaged over routes; with no active route it is the plain loss. Off by default (v2/v3).
    A method that shapes its loss (methods.registry.LossTerms: MaskDiT, drop) gets the weighted error and
    the denoised image D(x_noisy) with the noisy input x_noisy (MaskDiT's MAE term compares the two).
    """
    sigma4 = sigma.reshape(-1, 1, 1, 1).to(x.device)
    x_noisy = x + noise.to(x.device) * sigma4
    terms, masks = None, []
    if route_aware:
        denoised, masks = denoiser(x_noisy, sigma4.flatten(), class_labels, return_token_masks=True)
    else:
        denoised, terms = denoiser(x_noisy, sigma4.flatten(), class_labels, return_loss_terms=True)
    err = loss_weight(sigma4, denoiser.sigma_data) * (_at_least_fp32(denoised) - _at_least_fp32(x)) ** 2
    if terms is not None:
        return terms.apply(err, _at_least_fp32(denoised), x_noisy)
    return route_mean(err, masks)


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
