"""Sample-quality evaluation during training: EMA model, the objective's sampler (EDM Heun by default), FID
against a cached reference.

Every result records the protocol next to the number: samples, sampler, steps, guidance,
reference statistics, feature extractor, precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from diffusion.sampler import SamplerConfig


@dataclass
class EvalConfig:
    every: int = 0               # evaluate every N training steps (0 = only the final step when samples > 0)
    samples: int = 0             # images generated per evaluation (0 = no FID)
    batch: int = 250
    sampler_steps: int = 40
    cfg_scale: float = 1.0
    rate_guidance: Optional[list] = None  # [g1, g2, scale]
    seed: int = 12345            # the same noise and labels at every evaluation
    reference_split: str = "test"
    reference_limit: Optional[int] = None
    extractor: str = "auto"
    kid: bool = True
    prc: bool = True
    reference_npz: Optional[str] = None   # ADM reference batch / cached stats instead of dataset images
    vae: Optional[str] = None             # latent suites: AutoencoderKL (hub id or folder) to decode samples
    latent_scaling: float = 0.18215
    vae_batch: int = 32
    fid_at: str = "every"                 # "every" evaluation point, or only the "final" one
    # held-out evaluation loss at every evaluation point (measure/eval_loss.py); 0 images = off
    loss_images: int = 0
    loss_levels: int = 8
    loss_seed: int = 2024
    loss_batch: int = 256
    loss_split: str = "test"
    loss_path: Optional[str] = None       # latent suites: a latent folder of held-out images (runner/train.py)
    # a sample grid at every evaluation point: grid_per_class rows of up to 10 classes; 0 = off
    grid_per_class: int = 0
    grid_seed: int = 7


def _objective(objective):
    if objective is None:
        from objectives import build_objective

        return build_objective("edm")
    return objective


@torch.no_grad()
def generate(denoiser, count: int, data_shape, num_classes: int, sampler: SamplerConfig, seed: int,
             batch: int, device, progress: bool = False, objective=None) -> torch.Tensor:
    """``count`` samples in [-1, 1] (float32, CPU), class labels cycling 0..num_classes-1; seeded."""
    labels = torch.arange(count) % num_classes
    return generate_with_labels(denoiser, labels, data_shape, num_classes, sampler, seed, batch, device, progress,
                                objective)


@torch.no_grad()
def generate_with_labels(denoiser, labels: torch.Tensor, data_shape, num_classes: int, sampler: SamplerConfig,
                         seed: int, batch: int, device, progress: bool = False, objective=None) -> torch.Tensor:
    """One sample per label in [-1, 1] (float32, CPU); the noise is drawn from ``seed`` for all labels at once.
    ``objective`` (objectives/, default EDM) samples with its own ODE solver."""
    objective = _objective(objective)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), *data_shape, generator=g)
    was_training = denoiser.training
    denoiser.eval()
    out = []
    for start in range(0, len(labels), batch):
        x = objective.sample(denoiser, noise[start:start + batch].to(device), labels[start:start + batch].to(device),
                             sampler, null_label=num_classes, progress=progress)
        out.append(x.float().clamp(-1, 1).cpu())
    denoiser.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae_name: str, scaling: float, batch: int, device) -> torch.Tensor:
    """SD-VAE decode of scaled latents to images in [-1, 1] (diffusers AutoencoderKL)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_name).to(device).eval()
    out = [vae.decode(latents[i:i + batch].to(device) / scaling).sample.float().clamp(-1, 1).cpu()
           for i in range(0, len(latents), batch)]
    return torch.cat(out)


class FIDEvaluator:
    """Callable on a Trainer: samples from its EMA model and returns the metrics row fragment.

    ``reference`` is an npz path (ADM batch or cached statistics) or real images in [-1, 1].
    """

    def __init__(self, cfg: EvalConfig, reference, reference_name: str, num_classes: int, objective=None):
        from measure.fid import ImageReference, to_uint8

        self.cfg, self.num_classes, self.objective = cfg, num_classes, _objective(objective)
        self.reference = reference if isinstance(reference, str) else ImageReference(reference_name, to_uint8(reference))
        self.sampler = SamplerConfig(steps=cfg.sampler_steps, cfg_scale=cfg.cfg_scale,
                                     rate_guidance=tuple(cfg.rate_guidance) if cfg.rate_guidance else None)

    def prepare_reference(self) -> None:
        """Compute (or load) the cached reference statistics now, e.g. once before parallel runs start."""
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        from measure.fid import DEFAULT_CACHE_DIR, _reference, feature_extractor, resolve_extractor

        name, weights, _ = resolve_extractor(self.cfg.extractor)
        layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
        _reference(self.reference, feature_extractor(name, (layer,), weights, False), self.cfg.kid or self.cfg.prc,
                   DEFAULT_CACHE_DIR, 64, False, False)

    def __call__(self, denoiser, data_shape, device) -> dict:
        from measure.fid import compute_metrics, to_uint8

        images = generate(denoiser, self.cfg.samples, data_shape, self.num_classes, self.sampler, self.cfg.seed,
                          self.cfg.batch, device, progress=True, objective=self.objective)
        if self.cfg.vae:
            images = decode_latents(images, self.cfg.vae, self.cfg.latent_scaling, self.cfg.vae_batch, device)
        metrics = compute_metrics(to_uint8(images), self.reference, extractor=self.cfg.extractor,
                                  kid=self.cfg.kid, prc=self.cfg.prc, cuda=torch.device(device).type == "cuda")
        guidance = (f"rate {self.cfg.rate_guidance}" if self.cfg.rate_guidance
                    else f"cfg {self.cfg.cfg_scale:g}" if self.cfg.cfg_scale != 1 else "none")
        row = {"fid": metrics.get("fid"), "kid": metrics.get("kid_mean"), "precision": metrics.get("precision"),
               "recall": metrics.get("recall"), "fid_samples": metrics["num_samples"],
               "sampler": f"{self.objective.sampler_name()} fp32 EMA" + (f" + {self.cfg.vae} decode" if self.cfg.vae else ""), "sampler_steps": self.cfg.sampler_steps,
               "guidance": guidance, "reference": metrics["reference"],
               "feature_extractor": metrics["feature_extractor"]}
        return row
