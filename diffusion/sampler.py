"""The sampler settings and the guided network evaluation every objective's ODE solver calls.

- classifier-free guidance: D = D(x|null) + s (D(x|y) - D(x|null)), the null label being index num_classes;
- Sparse Guidance (Krause et al., arXiv 2601.01608; official CompVis/tread ``rf.py`` ``sample_tread``): two
  conditional evaluations with the network's sparsity forced at a strong (low) rate and a weak (high) rate,
  D = D(weak) + scale (D(strong) - D(weak)). ``sparse_guidance = (strong, weak, scale)`` is the paper's
  (gamma_strong, gamma_weak, omega) and the official code's (gamma1, gamma2, cfg_scale). The official code drops
  the class label in both branches; the paper's rule, and this one, keep it (benchmarks/compare_official.py
  checks both against the official code);
- classifier-free guidance with the unconditional evaluation forced at ``uncond_rate``:
  D = D(x|null; uncond_rate) + s (D(x|y) - D(x|null; uncond_rate)). For SPRINT, uncond_rate 1.0 drops the
  whole sparse path of the unconditional branch: that is its path-drop guidance (official ``forward_pdg``:
  conditional half dense, null-label half with mask tokens for the sparse path, combined as CFG).
The sampler reaches a method only through ``force_rate``; what a rate means is the method's business.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplerConfig:
    steps: int = 40
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    cfg_scale: float = 1.0            # 1 = no classifier-free guidance
    sparse_guidance: Optional[tuple] = None  # (strong rate, weak rate, scale) for Sparse Guidance
    route_rate: Optional[float] = None     # force routing at this rate for every evaluation
    uncond_rate: Optional[float] = None    # force this rate on CFG's unconditional evaluation only (PDG: 1.0)


def guided_denoise(denoiser, x, sigma, labels, cfg: SamplerConfig, null_label: int):
    """One guided evaluation of the denoiser (float32 in, float64 out)."""
    x32 = x.float()
    if cfg.sparse_guidance is not None:
        strong_rate, weak_rate, scale = cfg.sparse_guidance
        strong = denoiser(x32, sigma, labels, force_rate=strong_rate).double()
        if strong_rate == weak_rate:
            return strong
        weak = denoiser(x32, sigma, labels, force_rate=weak_rate).double()
        return weak + scale * (strong - weak)
    kwargs = {} if cfg.route_rate is None else {"force_rate": cfg.route_rate}
    if cfg.cfg_scale == 1.0:
        return denoiser(x32, sigma, labels, **kwargs).double()
    if cfg.uncond_rate is not None:  # the branches run at different rates, so they cannot share one batch
        cond = denoiser(x32, sigma, labels, **kwargs).double()
        null = torch.full_like(labels, null_label)
        uncond = denoiser(x32, sigma, null, force_rate=cfg.uncond_rate).double()
        return uncond + cfg.cfg_scale * (cond - uncond)
    both = denoiser(torch.cat([x32, x32]), sigma, torch.cat([labels, torch.full_like(labels, null_label)]), **kwargs)
    cond, uncond = both.double().chunk(2)
    return uncond + cfg.cfg_scale * (cond - uncond)
