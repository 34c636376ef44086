"""``objective=edm`` (the default): EDM (Karras et al. 2022) preconditioning, log-normal noise levels and
weighted loss, the deterministic Heun sampler; the numerics live in diffusion/edm.py and diffusion/sampler.py."""
from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from core.errors import ConfigError
from diffusion.edm import EDMConfig, EDMDenoiser, edm_loss, sample_sigma
from diffusion.sampler import heun_sample

from .registry import Objective, register_objective


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
        return edm_loss(model, x, labels, draws["sigma"], draws["noise"], route_aware=route_aware)

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
