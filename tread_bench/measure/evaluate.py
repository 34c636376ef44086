"""Sample-quality evaluation during training: EMA model, the objective's sampler (EDM Heun by default), FID
against a cached reference.

Every result records the protocol next to the number: samples, sampler, steps, guidance,
reference statistics, feature extractor, precision.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Dataset

from diffusion.sampler import SamplerConfig

#: ``eval.vae`` of dry runs (scale=dryrun): the SD-VAE architecture (the configuration of stabilityai/sd-vae-ft-ema)
#: with seeded random weights. It decodes latents to 256x256 images at the real decoder's cost and memory, offline,
#: so a dry run exercises decode + Inception + FID at full size; its images, and any FID through it, mean nothing.
RANDOM_VAE = "random-sd-vae"
_SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      layers_per_block=2, act_fn="silu", norm_num_groups=32, sample_size=256)
#: SD-VAE's decoder upsamples latents by 8 (three 2x upsamplings)
VAE_UPSAMPLING = 8


@dataclass
class EvalConfig:
    every: int = 0               # evaluate every N training steps (0 = only the final step when samples > 0)
    samples: int = 0             # images generated per evaluation (0 = no FID)
    batch: int = 250
    sampler_steps: int = 40
    cfg_scale: float = 1.0
    rate_guidance: Optional[list] = None  # [g1, g2, scale]
    uncond_rate: Optional[float] = None   # with cfg_scale: CFG's unconditional branch at this forced rate (PDG: 1.0)
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
    # held-out evaluation loss at every evaluation point (tread_bench/measure/eval_loss.py); 0 images = off
    loss_images: int = 0
    loss_levels: int = 8
    loss_seed: int = 2024
    loss_batch: int = 256
    loss_split: str = "test"
    loss_path: Optional[str] = None       # latent suites: a latent folder of held-out images (tread_bench/engine/training.py)
    # a sample grid at every evaluation point: grid_per_class rows of up to 10 classes; 0 = off
    grid_per_class: int = 0
    grid_seed: int = 7


def _objective(objective):
    if objective is None:
        from diffusion import build_objective

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
    ``objective`` (diffusion/, default EDM) samples with its own ODE solver."""
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


@functools.lru_cache(maxsize=1)
def load_vae(vae_name: str, device: str):
    """The diffusers AutoencoderKL ``vae_name`` (hub id or folder; :data:`RANDOM_VAE`: random weights, seed 0),
    kept for the next evaluation of the process."""
    from diffusers import AutoencoderKL

    if vae_name == RANDOM_VAE:
        with torch.random.fork_rng(devices=[]):  # the same weights in every process, the caller's RNG untouched
            torch.manual_seed(0)
            vae = AutoencoderKL(**_SD_VAE_CONFIG)
    else:
        vae = AutoencoderKL.from_pretrained(vae_name)
    return vae.to(device).eval().requires_grad_(False)


def vae_tag(vae_name: str) -> str:
    """Names a VAE in reference-statistics cache keys (random weights: their seed and the diffusers release)."""
    if vae_name == RANDOM_VAE:
        import diffusers

        return f"{RANDOM_VAE}-seed0-diffusers{diffusers.__version__}"
    return str(vae_name).replace("/", "_")


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae_name: str, scaling: float, batch: int, device) -> torch.Tensor:
    """SD-VAE decode of scaled latents to images in [-1, 1] (diffusers AutoencoderKL)."""
    vae = load_vae(vae_name, str(torch.device(device)))
    out = [vae.decode(latents[i:i + batch].to(device) / scaling).sample.float().clamp(-1, 1).cpu()
           for i in range(0, len(latents), batch)]
    return torch.cat(out)


class DecodedLatents(Dataset):
    """Reference latents as the uint8 3xHxW images torch-fidelity reads, each decoded by the VAE when read. Its
    ``shape`` is known without decoding, so cached reference statistics are found without running the VAE."""

    def __init__(self, latents: torch.Tensor, vae_name: str, scaling: float):
        self.latents, self.vae_name, self.scaling = latents.detach().cpu(), vae_name, scaling
        n, _, h, w = self.latents.shape
        self.shape = (n, 3, VAE_UPSAMPLING * h, VAE_UPSAMPLING * w)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> torch.Tensor:
        from tread_bench.measure.fid import to_uint8

        device = "cuda" if torch.cuda.is_available() else "cpu"
        image = to_uint8(decode_latents(self.latents[i:i + 1], self.vae_name, self.scaling, 1, device))[0]
        if tuple(image.shape) != self.shape[1:]:
            from tread_bench.core.errors import ConfigError

            raise ConfigError(f"VAE {self.vae_name} decoded a {tuple(self.latents.shape[1:])} latent to "
                              f"{tuple(image.shape)}, expected {self.shape[1:]} (an SD-VAE upsamples by 8)")
        return image


class FIDEvaluator:
    """Callable on a Trainer: samples from its EMA model and returns the metrics row fragment.

    ``reference`` is an npz path (ADM batch or cached statistics) or real images in [-1, 1].
    """

    def __init__(self, cfg: EvalConfig, reference, reference_name: str, num_classes: int, objective=None):
        from tread_bench.measure.fid import ImageReference, to_uint8

        self.cfg, self.num_classes, self.objective = cfg, num_classes, _objective(objective)
        if isinstance(reference, str):
            self.reference = reference
        elif cfg.vae and reference.shape[1] not in (1, 3):  # latents (a dry run's synthetic ones): decoded as samples are
            self.reference = ImageReference(f"{reference_name}-decoded-{vae_tag(cfg.vae)}",
                                            DecodedLatents(reference, cfg.vae, cfg.latent_scaling))
        else:
            self.reference = ImageReference(reference_name, to_uint8(reference))
        self.sampler = SamplerConfig(steps=cfg.sampler_steps, cfg_scale=cfg.cfg_scale,
                                     rate_guidance=tuple(cfg.rate_guidance) if cfg.rate_guidance else None,
                                     uncond_rate=cfg.uncond_rate)

    def prepare_reference(self) -> None:
        """Compute (or load) the cached reference statistics now, e.g. once before parallel runs start."""
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        from tread_bench.measure.fid import feature_extractor, load_reference, resolve_extractor

        name, weights, _ = resolve_extractor(self.cfg.extractor)
        layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
        load_reference(self.reference, feature_extractor(name, (layer,), weights, False),
                       need_features=self.cfg.kid or self.cfg.prc)

    def __call__(self, denoiser, data_shape, device) -> dict:
        from tread_bench.measure.fid import compute_metrics, to_uint8

        images = generate(denoiser, self.cfg.samples, data_shape, self.num_classes, self.sampler, self.cfg.seed,
                          self.cfg.batch, device, progress=True, objective=self.objective)
        if self.cfg.vae:
            images = decode_latents(images, self.cfg.vae, self.cfg.latent_scaling, self.cfg.vae_batch, device)
        metrics = compute_metrics(to_uint8(images), self.reference, extractor=self.cfg.extractor,
                                  kid=self.cfg.kid, prc=self.cfg.prc, cuda=torch.device(device).type == "cuda")
        guidance = (f"rate {self.cfg.rate_guidance}" if self.cfg.rate_guidance
                    else f"cfg {self.cfg.cfg_scale:g}" + ("" if self.cfg.uncond_rate is None
                                                          else f", uncond rate {self.cfg.uncond_rate:g}")
                    if self.cfg.cfg_scale != 1 else "none")
        row = {"fid": metrics.get("fid"), "kid": metrics.get("kid_mean"), "precision": metrics.get("precision"),
               "recall": metrics.get("recall"), "fid_samples": metrics["num_samples"],
               "sampler": f"{self.objective.sampler_name()} fp32 EMA" + (f" + {self.cfg.vae} decode" if self.cfg.vae else ""), "sampler_steps": self.cfg.sampler_steps,
               "guidance": guidance, "reference": metrics["reference"],
               "feature_extractor": metrics["feature_extractor"]}
        return row
