"""``objective=flow``: the linear interpolant with velocity prediction, in SPRINT's convention (t = 1 is noise).

    x_t = (1 - t) x + t eps,   eps ~ N(0, I),   t ~ U[0, 1]
    loss = mean over pixels of (v(x_t, t, y) - (eps - x))^2           (velocity, no weight)

SiT (Ma et al. 2024) runs time the other way (x_t = t x + (1 - t) eps, t = 1 is data, v = x - eps): the two are
the same model after t -> 1 - t and v -> -v, so a SiT checkpoint is used here by feeding it 1 - t and negating its
output. The network is conditioned on t in [0, 1] (DiT's timestep embedder). Sampling integrates dx/dt = v from
t = 1 (noise) to t = 0 with Euler or Heun steps on a uniform grid (Heun: 2 evaluations per step). Classifier-free
and Sparse Guidance combine velocities as EDM combines denoised images (diffusion.sampler.guided_denoise).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from tread_bench.core.errors import ConfigError
from .objective import Objective, at_least_fp32, register_objective, route_mean
from .sampler import guided_denoise

SOLVERS = ("euler", "heun")


class VelocityModel(nn.Module):
    """v(x_t; t, y) = F(x_t; t, y): the network itself, conditioned on t (no preconditioning)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t, class_labels, return_loss_terms=False, **net_kwargs):
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        if return_loss_terms and getattr(self.net, "shapes_loss", False):  # only such methods take the flag
            net_kwargs["return_loss_terms"] = True
        result = self.net(x, t, class_labels, **net_kwargs)
        out, extra = (result if isinstance(result, tuple) else (result, None))
        out = at_least_fp32(out)
        return (out, extra) if extra is not None or return_loss_terms else out


@register_objective("flow")
class Flow(Objective):
    level_symbol = "t"

    def __init__(self, solver: str = "heun"):
        if solver not in SOLVERS:
            raise ConfigError(f"objective flow: unknown solver '{solver}'; choose one of {', '.join(SOLVERS)}")
        self.solver = solver

    def wrap(self, net):
        return VelocityModel(net)

    def draw(self, batch, shape, generator):
        t = torch.rand(batch, generator=generator)
        return {"t": t, "noise": torch.randn((batch, *shape), generator=generator)}

    def loss(self, model, x, labels, draws, route_aware=False):
        t4 = draws["t"].reshape(-1, 1, 1, 1).to(x.device, non_blocking=True)
        noise = draws["noise"].to(x.device, non_blocking=True)
        x_t = (1 - t4) * x + t4 * noise
        terms, masks = None, []
        if route_aware:
            velocity, masks = model(x_t, t4.flatten(), labels, return_token_masks=True)
        else:  # a method that shapes its loss (MaskDiT, drop) returns its LossTerms
            velocity, terms = model(x_t, t4.flatten(), labels, return_loss_terms=True)
        target = at_least_fp32(noise) - at_least_fp32(x)
        err = (at_least_fp32(velocity) - target) ** 2
        if terms is not None:  # the prediction is the velocity, the network input x_t (MaskDiT's MAE pair)
            return terms.apply(err, at_least_fp32(velocity), x_t)
        return route_mean(err, masks)

    def eval_levels(self, count):
        return (torch.arange(count, dtype=torch.float64) + 0.5) / count  # mid-quantiles of U[0, 1]

    def level_draws(self, level, noise):
        return {"t": level.expand(len(noise)), "noise": noise}

    @torch.no_grad()
    def sample(self, model, noise, labels, sampler, null_label, progress=False):
        t = torch.linspace(1.0, 0.0, sampler.steps + 1, dtype=torch.float64, device=noise.device)
        x = noise.double()
        for i in tqdm(range(sampler.steps), desc="sampling", disable=not progress, leave=False):
            h = t[i + 1] - t[i]
            v_cur = guided_denoise(model, x, t[i], labels, sampler, null_label)
            x_next = x + h * v_cur
            if self.solver == "heun":
                v_next = guided_denoise(model, x_next, t[i + 1], labels, sampler, null_label)
                x_next = x + h * (0.5 * v_cur + 0.5 * v_next)
            x = x_next
        return x

    def nfe(self, steps):
        return 2 * steps if self.solver == "heun" else steps

    def sampler_name(self):
        return f"flow ODE {self.solver.capitalize()} (uniform t)"
