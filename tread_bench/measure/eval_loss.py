"""Held-out evaluation loss: the denoising loss of a model on fixed images, noise levels and noise.

Everything random is fixed once (the held-out images, the grid of noise levels, one noise draw per image
and level), so the value differs between two evaluations only because the model differs: cheap,
low-variance, and comparable across runs, seeds and resumes. MLPerf Training's current diffusion
benchmark uses such an evaluation loss as its quality target.

Levels: the objective's fixed grid (diffusion/edm.py, flow.py ``eval_levels``), K equal-probability bins of its
training draws, so the equal-weight mean over levels (the "weighted mean", weights 1/K) estimates the
expected training loss, the quantity training lowers. EDM: the K quantiles sigma_k = exp(P_mean + P_std *
Phi^-1((k + 1/2) / K)) of the training distribution of log sigma, loss E_sigma[lambda(sigma) ||D(x + sigma n;
sigma) - x||^2]; flow: t_k = (k + 1/2) / K, loss E_t ||v(x_t, t) - (n - x)||^2 (both means over pixels).
The model is evaluated in eval mode: the EMA weights, no routing, no label dropout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from diffusion import Objective, build_objective



@dataclass
class EvalLossConfig:
    images: int = 512           # held-out images (the first ones of the split); 0 turns the loss off
    levels: int = 8             # noise levels (quantiles of the training distribution)
    seed: int = 2024            # the fixed noise draw
    batch: int = 256
    split: str = "test"


class HeldOutLoss:
    """``HeldOutLoss(images, labels, cfg, objective)(model) -> {"eval_loss": mean, "eval_loss_<level>": ...}``
    (``objective`` defaults to EDM; columns eval_loss_sigma<s> for EDM, eval_loss_t<t> for flow)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: EvalLossConfig = EvalLossConfig(),
                 objective: Optional[Objective] = None):
        self.cfg = cfg
        self.objective = objective or build_objective("edm")
        self.images, self.labels = images[:cfg.images].float(), labels[:cfg.images].long()
        self.levels = self.objective.eval_levels(cfg.levels).float()
        g = torch.Generator().manual_seed(cfg.seed)
        self.noise = torch.randn((cfg.levels, *self.images.shape), generator=g)

    @property
    def sigmas(self) -> torch.Tensor:  # EDM's name for the levels
        return self.levels

    def column_names(self) -> list[str]:
        return [f"eval_loss_{self.objective.level_symbol}{v:.3g}" for v in self.levels.tolist()]

    @torch.no_grad()
    def per_level(self, denoiser, device="cpu") -> torch.Tensor:
        """(levels,) float64: mean per-image loss at each noise level."""
        was_training = denoiser.training
        denoiser.eval()
        totals = torch.zeros(len(self.levels), dtype=torch.float64)
        n, b = len(self.images), self.cfg.batch
        for k, level in enumerate(self.levels):
            for start in range(0, n, b):
                x = self.images[start:start + b].to(device)
                y = self.labels[start:start + b].to(device)
                draws = self.objective.level_draws(level.to(device), self.noise[k, start:start + b].to(device))
                totals[k] += self.objective.loss(denoiser, x, y, draws).double().sum().cpu()
        denoiser.train(was_training)
        return totals / n

    def __call__(self, denoiser, device="cpu") -> dict:
        levels = self.per_level(denoiser, device)
        row = {"eval_loss": float(levels.mean())}  # equal weights: each level is a 1/K probability bin
        row.update({name: float(v) for name, v in zip(self.column_names(), levels)})
        return row
