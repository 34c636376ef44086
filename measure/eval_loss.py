"""Held-out evaluation loss: the denoising loss of a model on fixed images, noise levels and noise.

Everything random is fixed once (the held-out images, the grid of noise levels, one noise draw per image
and level), so the value differs between two evaluations only because the model differs: cheap,
low-variance, and comparable across runs, seeds and resumes. MLPerf Training's current diffusion
benchmark uses such an evaluation loss as its quality target.

Noise levels: the K quantiles sigma_k = exp(P_mean + P_std * Phi^-1((k + 1/2) / K)) of EDM's training
distribution of log sigma, so each level stands for a bin of probability 1/K and the equal-weight mean
over levels (the "weighted mean", weights 1/K) estimates the expected training loss
E_sigma[lambda(sigma) ||D(x + sigma n; sigma) - x||^2] (mean over pixels), the quantity training lowers.
The model is evaluated in eval mode: the EMA weights, no routing, no label dropout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from scipy import stats

from diffusion.edm import EDMConfig, edm_loss


@dataclass
class EvalLossConfig:
    images: int = 512           # held-out images (the first ones of the split); 0 turns the loss off
    levels: int = 8             # noise levels (quantiles of the training distribution)
    seed: int = 2024            # the fixed noise draw
    batch: int = 256
    split: str = "test"


def quantile_sigmas(levels: int, edm: EDMConfig = EDMConfig()) -> torch.Tensor:
    """(levels,) float64 noise levels at the mid-quantiles of log sigma ~ N(P_mean, P_std^2)."""
    z = stats.norm.ppf((np.arange(levels) + 0.5) / levels)
    return torch.from_numpy(np.exp(edm.P_mean + edm.P_std * z))


class HeldOutLoss:
    """``HeldOutLoss(images, labels, cfg)(denoiser) -> {"eval_loss": mean, "eval_loss_sigma<k>": ...}``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: EvalLossConfig = EvalLossConfig(),
                 edm: EDMConfig = EDMConfig(), loss_fn: Optional[Callable] = None):
        self.cfg = cfg
        self.images, self.labels = images[:cfg.images].float(), labels[:cfg.images].long()
        self.sigmas = quantile_sigmas(cfg.levels, edm).float()
        g = torch.Generator().manual_seed(cfg.seed)
        self.noise = torch.randn((cfg.levels, *self.images.shape), generator=g)
        self.loss_fn = loss_fn or edm_loss

    def column_names(self) -> list[str]:
        return [f"eval_loss_sigma{s:.3g}" for s in self.sigmas.tolist()]

    @torch.no_grad()
    def per_level(self, denoiser, device="cpu") -> torch.Tensor:
        """(levels,) float64: mean per-image loss at each noise level."""
        was_training = denoiser.training
        denoiser.eval()
        totals = torch.zeros(len(self.sigmas), dtype=torch.float64)
        n, b = len(self.images), self.cfg.batch
        for k, sigma in enumerate(self.sigmas):
            for start in range(0, n, b):
                x = self.images[start:start + b].to(device)
                y = self.labels[start:start + b].to(device)
                s = sigma.expand(len(x)).to(device)
                totals[k] += self.loss_fn(denoiser, x, y, s, self.noise[k, start:start + b].to(device)).double().sum().cpu()
        denoiser.train(was_training)
        return totals / n

    def __call__(self, denoiser, device="cpu") -> dict:
        levels = self.per_level(denoiser, device)
        row = {"eval_loss": float(levels.mean())}  # equal weights: each level is a 1/K probability bin
        row.update({name: float(v) for name, v in zip(self.column_names(), levels)})
        return row
