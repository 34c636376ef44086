"""EDM (Karras et al. 2022), whole: log-normal noise levels, preconditioning, weighted loss, the rho-schedule
and deterministic Heun sampler (Algorithm 1), and the ``objective=edm`` plug-in (the default) around them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from tread_bench.core.errors import ConfigError

from .objective import Objective, at_least_fp32, register_objective, route_mean
from .sampler import SamplerConfig, guided_denoise


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
    tread_bench.methods.registry.LossTerms), else None (the plain loss).
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
        denoised = c_skip * x + c_out * at_least_fp32(out)
        return (denoised, extra) if extra is not None or return_loss_terms else denoised


def sample_sigma(batch: int, cfg: EDMConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """log-normal training noise levels, drawn on the CPU (device independent, reproducible)."""
    return (torch.randn(batch, generator=generator) * cfg.P_std + cfg.P_mean).exp()


def edm_loss(denoiser: EDMDenoiser, x: torch.Tensor, class_labels: torch.Tensor, sigma: torch.Tensor,
             noise: torch.Tensor, route_aware: bool = False, sigma_data: float | None = None) -> torch.Tensor:
    """Per-sample weighted denoising loss, shape (B,). ``sigma_data``: the objective's (default: the denoiser's;
    the training loop passes it, since its model may be a data-parallel wrapper without the attribute).

    ``route_aware`` (paper v1): the loss is taken only over pixels of tokens each route processed,
    averaged over routes; with no active route it is the plain loss. Off by default (v2/v3).
    A method that shapes its loss (tread_bench.methods.registry.LossTerms: MaskDiT, drop) gets the weighted error and
    the denoised image D(x_noisy) with the noisy input x_noisy (MaskDiT's MAE term compares the two).
    """
    sigma4 = sigma.reshape(-1, 1, 1, 1).to(x.device, non_blocking=True)
    x_noisy = x + noise.to(x.device, non_blocking=True) * sigma4
    terms, masks = None, []
    if route_aware:
        denoised, masks = denoiser(x_noisy, sigma4.flatten(), class_labels, return_token_masks=True)
    else:
        denoised, terms = denoiser(x_noisy, sigma4.flatten(), class_labels, return_loss_terms=True)
    sigma_data = denoiser.sigma_data if sigma_data is None else sigma_data
    err = loss_weight(sigma4, sigma_data) * (at_least_fp32(denoised) - at_least_fp32(x)) ** 2
    if terms is not None:
        return terms.apply(err, at_least_fp32(denoised), x_noisy)
    return route_mean(err, masks)


def sigma_steps(cfg: SamplerConfig, device=None) -> torch.Tensor:
    """t_0..t_{N-1} from the rho-schedule, then t_N = 0 (float64)."""
    i = torch.arange(cfg.steps, dtype=torch.float64, device=device)
    smax, smin = cfg.sigma_max ** (1 / cfg.rho), cfg.sigma_min ** (1 / cfg.rho)
    t = (smax + i / (cfg.steps - 1) * (smin - smax)) ** cfg.rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


@torch.no_grad()
def heun_sample(denoiser, noise: torch.Tensor, labels: torch.Tensor, cfg: SamplerConfig, null_label: int,
                progress: bool = False) -> torch.Tensor:
    """Integrate the probability-flow ODE from sigma_max to 0; ``noise`` is N(0, I) of the output shape."""
    t = sigma_steps(cfg, noise.device)
    x = noise.double() * t[0]
    for i in tqdm(range(cfg.steps), desc="sampling", disable=not progress, leave=False):
        t_cur, t_next = t[i], t[i + 1]
        d_cur = (x - guided_denoise(denoiser, x, t_cur, labels, cfg, null_label)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if i < cfg.steps - 1:  # 2nd-order correction, skipped on the final step to sigma = 0
            d_next = (x_next - guided_denoise(denoiser, x_next, t_next, labels, cfg, null_label)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


def quantile_sigmas(levels: int, edm: EDMConfig = EDMConfig()) -> torch.Tensor:
    """(levels,) float64 noise levels at the mid-quantiles of log sigma ~ N(P_mean, P_std^2)."""
    z = stats.norm.ppf((np.arange(levels) + 0.5) / levels)
    return torch.from_numpy(np.exp(edm.P_mean + edm.P_std * z))


@register_objective("edm")
class EDM(Objective):
    level_symbol = "sigma"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, solver: str = "heun"):
        if solver != "heun":
            raise ConfigError(f"objective edm samples with solver heun only, got '{solver}'")
        self.cfg = EDMConfig(P_mean, P_std, sigma_data)

    def wrap(self, net):
        return EDMDenoiser(net, self.cfg.sigma_data)

    def draw(self, batch, shape, generator):
        sigma = sample_sigma(batch, self.cfg, generator)
        return {"sigma": sigma, "noise": torch.randn((batch, *shape), generator=generator)}

    def loss(self, model, x, labels, draws, route_aware=False):
        return edm_loss(model, x, labels, draws["sigma"], draws["noise"], route_aware=route_aware,
                        sigma_data=self.cfg.sigma_data)

    def eval_levels(self, count):
        return quantile_sigmas(count, self.cfg)

    def level_draws(self, level, noise):
        return {"sigma": level.expand(len(noise)), "noise": noise}

    def sample(self, model, noise, labels, sampler, null_label, progress=False):
        return heun_sample(model, noise, labels, sampler, null_label=null_label, progress=progress)

    def nfe(self, steps):
        return 2 * steps - 1  # no 2nd-order correction on the last step to sigma = 0

    def sampler_name(self):
        return "EDM Heun (deterministic)"
