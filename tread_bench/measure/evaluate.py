"""Sample-quality evaluation during training: EMA model, the objective's sampler (EDM Heun by default), FID
against a cached reference.

Every result records the protocol next to the number: samples, sampler, steps, guidance,
reference statistics, feature extractor, precision.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Dataset

from diffusion.sampler import SamplerConfig
from tread_bench.core.errors import ConfigError
from tread_bench.training.precision import autocast_dtype, resolve_precision

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
    at: Optional[list] = None    # and at these steps (e.g. log-spaced over a long run)
    # a method entry's name: its runs also evaluate at the steps where their training FLOPs equal another method's
    # (same backbone, size and seed) at that method's evaluation steps (tread_bench/engine/eval_steps.py)
    flop_match: Optional[str] = None
    samples: int = 0             # images generated per evaluation (0 = no FID)
    batch: int = 250
    sampler_steps: int = 40
    cfg_scale: float = 1.0
    sparse_guidance: Optional[list] = None  # [strong rate, weak rate, scale] (diffusion/sampler.py)
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
    loss_path: Optional[str] = None       # latent suites: a latent folder of held-out images (tread_bench/engine/lifecycle.py)
    # a sample grid at every evaluation point: grid_per_class rows of up to 10 classes; 0 = off
    grid_per_class: int = 0
    grid_seed: int = 7


def _objective(objective):
    if objective is None:
        from diffusion import build_objective

        return build_objective("edm")
    return objective


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s noise. torch's CPU generator keeps only the low 32 bits of a seed, so the
    index is added modulo 2**32: distinct indices of one evaluation get distinct generators."""
    return (int(seed) * 0x9E3779B1 + int(index)) % 2 ** 32


def sample_noise(indices, data_shape, seed: int) -> torch.Tensor:
    """(len(indices), *data_shape) float32 CPU noise, each sample's row from its own generator
    (:func:`sample_seed`): a sample's noise does not depend on the batch or the process that draws it."""
    out = torch.empty(len(indices), *data_shape)
    g = torch.Generator()
    for row, index in enumerate(indices):
        g.manual_seed(sample_seed(seed, index))
        out[row] = torch.randn(tuple(data_shape), generator=g)
    return out


def sample_labels(indices, num_classes: int) -> torch.Tensor:
    """Sample ``i``'s class label: ``i mod num_classes`` (the classes cycle, so every class is sampled evenly)."""
    return torch.as_tensor(list(indices), dtype=torch.long) % num_classes


@torch.no_grad()
def sample_batch(denoiser, noise: torch.Tensor, labels: torch.Tensor, num_classes: int, sampler: SamplerConfig,
                 device, objective=None, precision: str = "fp32", progress: bool = False) -> torch.Tensor:
    """Samples in [-1, 1] (float32, on ``device``) from ``noise`` and ``labels``, by ``objective``'s ODE solver
    (default EDM) with the network under ``precision``'s autocast (a resolved precision: fp32, bf16, fp16)."""
    objective = _objective(objective)
    dtype = autocast_dtype(precision)
    device = torch.device(device)
    was_training = denoiser.training
    denoiser.eval()
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            x = objective.sample(denoiser, noise.to(device), labels.to(device), sampler, null_label=num_classes,
                                 progress=progress)
    finally:
        denoiser.train(was_training)
    return x.float().clamp(-1, 1)


def sample_chunks(count: int, batch: int) -> list[range]:
    """The sample indices ``0..count-1`` in batches of ``batch``: the unit of work a process samples, fixed by
    ``count`` and ``batch`` alone, so every sample is made in the same batch whatever the process count."""
    if count < 0 or batch < 1:
        raise ConfigError(f"eval.samples = {count}, eval.batch = {batch}: use samples >= 0 and batch >= 1")
    return [range(start, min(start + batch, count)) for start in range(0, count, batch)]


@contextlib.contextmanager
def chunk_draws(denoiser, seed: int):
    """A context whose ``reseed(chunk)`` makes the network's own random draws (token selection at a forced rate)
    a function of the chunk alone, whatever the process count: drawn for the chunk only (shard (0, 1)), from a
    generator seeded by (seed + 1, the chunk's first index), a stream apart from the noise's. The network's draw
    state and shard are restored afterwards."""
    net = getattr(denoiser, "net", None)
    saved = net.rng_state() if net is not None and hasattr(net, "rng_state") else None

    def reseed(chunk: range) -> None:
        if saved is not None:
            net.set_rng_state(torch.Generator().manual_seed(sample_seed(seed + 1, chunk.start)).get_state())

    if saved is None:
        yield reseed
        return
    from accelerate import PartialState

    net.set_shard(0, 1)
    try:
        yield reseed
    finally:
        state = PartialState()
        net.set_rng_state(saved)
        net.set_shard(state.process_index, state.num_processes)


@torch.no_grad()
def generate(denoiser, count: int, data_shape, num_classes: int, sampler: SamplerConfig, seed: int,
             batch: int, device, progress: bool = False, objective=None, precision: str = "fp32") -> torch.Tensor:
    """``count`` samples in [-1, 1] (float32, CPU), all in memory: the samples FID measures (same noise and labels
    per index, :func:`sample_noise`), for small counts; FID itself streams them (:class:`FIDEvaluator`)."""
    out = []
    with chunk_draws(denoiser, seed) as reseed:
        for chunk in sample_chunks(count, batch):
            reseed(chunk)
            out.append(sample_batch(denoiser, sample_noise(chunk, data_shape, seed), sample_labels(chunk, num_classes),
                                    num_classes, sampler, device, objective, precision, progress).cpu())
    return torch.cat(out) if out else torch.empty(0, *data_shape)


@torch.no_grad()
def generate_with_labels(denoiser, labels: torch.Tensor, data_shape, num_classes: int, sampler: SamplerConfig,
                         seed: int, batch: int, device, progress: bool = False, objective=None) -> torch.Tensor:
    """One sample per label in [-1, 1] (float32, CPU; sample grids); the noise is drawn from ``seed`` for all
    labels at once. ``objective`` (diffusion/, default EDM) samples with its own ODE solver."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), *data_shape, generator=g)
    out = [sample_batch(denoiser, noise[start:start + batch], labels[start:start + batch], num_classes, sampler,
                        device, objective, progress=progress).cpu()
           for start in range(0, len(labels), batch)]
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
def decode_latents(latents: torch.Tensor, vae_name: str, scaling: float, batch: int, device,
                   to_cpu: bool = True) -> torch.Tensor:
    """SD-VAE decode of scaled latents to images in [-1, 1] (diffusers AutoencoderKL, fp32), on the CPU or, with
    ``to_cpu=False``, left on ``device``."""
    vae = load_vae(vae_name, str(torch.device(device)))
    out = []
    for i in range(0, len(latents), batch):
        x = vae.decode(latents[i:i + batch].to(device) / scaling).sample.float().clamp(-1, 1)
        out.append(x.cpu() if to_cpu else x)
    return torch.cat(out)


class DecodedLatents(Dataset):
    """Reference latents as the uint8 3xHxW images torch-fidelity reads, each decoded by the VAE when read. Its
    ``shape`` is known without decoding, so cached reference statistics are found without running the VAE.
    Feature extraction reads it through :meth:`batches` (decoded ``batch`` at a time on the GPU when there is one)."""

    def __init__(self, latents: torch.Tensor, vae_name: str, scaling: float, batch: int = 32):
        self.latents, self.vae_name, self.scaling, self.batch = latents.detach().cpu(), vae_name, scaling, batch
        n, _, h, w = self.latents.shape
        self.shape = (n, 3, VAE_UPSAMPLING * h, VAE_UPSAMPLING * w)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.decode(i, i + 1)[0].cpu()

    def decode(self, start: int, end: int) -> torch.Tensor:
        """Images ``start..end-1`` as uint8 (n, 3, H, W), on the device that decoded them."""
        from tread_bench.measure.fid import to_uint8

        device = "cuda" if torch.cuda.is_available() else "cpu"
        images = to_uint8(decode_latents(self.latents[start:end], self.vae_name, self.scaling, self.batch, device,
                                         to_cpu=False))
        if tuple(images.shape[1:]) != self.shape[1:]:
            raise ConfigError(f"VAE {self.vae_name} decoded a {tuple(self.latents.shape[1:])} latent to "
                              f"{tuple(images.shape[1:])}, expected {self.shape[1:]} (an SD-VAE upsamples by 8)")
        return images

    def batches(self, batch_size: int):
        """The images, ``batch_size`` at a time (uint8, on the decoding device)."""
        for start in range(0, len(self), batch_size):
            yield self.decode(start, min(start + batch_size, len(self)))


#: images per Inception forward pass: Inception resizes to 299x299, whatever the sampling batch
FEATURE_BATCH = 64


class FIDEvaluator:
    """Callable on a Trainer: samples from its EMA model and returns the metrics row fragment.

    ``reference`` is an npz path (ADM batch or cached statistics) or real images in [-1, 1]. ``precision``
    follows the precision rule (tread_bench/training/precision.py; auto = bf16 autocast on CUDA, fp32 elsewhere)
    and applies to the network while sampling; VAE decoding and Inception run in fp32.

    The samples are split between the processes (whole batches, :func:`sample_chunks`) and streamed: each batch
    is sampled, decoded, made uint8 and turned into features before the next, so only the features (e.g. 2048
    floats per sample) are kept. Each sample's noise and label are fixed by its index, so the metrics do not
    depend on the number of processes; the main process computes them from the gathered features.
    """

    def __init__(self, cfg: EvalConfig, reference, reference_name: str, num_classes: int, objective=None,
                 precision: str = "auto"):
        from tread_bench.measure.fid import ImageReference, to_uint8

        self.cfg, self.num_classes, self.objective = cfg, num_classes, _objective(objective)
        resolve_precision(precision, "cpu")  # a bad name fails here, before any training
        self.precision = precision
        sample_chunks(cfg.samples, cfg.batch)
        if isinstance(reference, str):
            self.reference = reference
        elif cfg.vae and reference.shape[1] not in (1, 3):  # latents (a dry run's synthetic ones): decoded as samples are
            self.reference = ImageReference(f"{reference_name}-decoded-{vae_tag(cfg.vae)}",
                                            DecodedLatents(reference, cfg.vae, cfg.latent_scaling, cfg.vae_batch))
        else:
            self.reference = ImageReference(reference_name, to_uint8(reference))
        self.sampler = SamplerConfig(steps=cfg.sampler_steps, cfg_scale=cfg.cfg_scale,
                                     sparse_guidance=tuple(cfg.sparse_guidance) if cfg.sparse_guidance else None,
                                     uncond_rate=cfg.uncond_rate)

    def extractor(self, device):
        """(registered name, FID layer, the feature extractor on ``device``)."""
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        from tread_bench.measure.fid import feature_extractor, resolve_extractor

        name, weights, _ = resolve_extractor(self.cfg.extractor)
        layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
        device = torch.device(device)
        return name, layer, feature_extractor(name, (layer,), weights, device.type == "cuda", device=device)

    def prepare_reference(self) -> None:
        """Compute (or load) the cached reference statistics now, e.g. once before parallel runs start; on the GPU
        when there is one."""
        from tread_bench.measure.fid import load_reference

        cuda = torch.cuda.is_available()
        _, _, fe = self.extractor("cuda" if cuda else "cpu")
        load_reference(self.reference, fe, need_features=self.cfg.kid or self.cfg.prc, cuda=cuda)

    @torch.no_grad()
    def sample_features(self, denoiser, data_shape, device) -> torch.Tensor:
        """(samples, D) float32 CPU features of all samples, in index order; every process calls it (collective)."""
        from accelerate import PartialState
        from accelerate.utils import gather
        from tqdm.auto import tqdm

        from tread_bench.measure.fid import batch_features, to_uint8

        state, device = PartialState(), torch.device(device)
        precision = resolve_precision(self.precision, str(device))
        _, layer, fe = self.extractor(device)
        chunks = sample_chunks(self.cfg.samples, self.cfg.batch)
        # padding repeats the last batch on some processes: each holds as many rows as the others, for gather
        with state.split_between_processes(list(range(len(chunks))), apply_padding=True) as mine:
            mine = list(mine)
        rows = len(mine) * self.cfg.batch
        feats, index, filled = None, torch.full((rows,), -1, dtype=torch.long, device=device), 0
        with chunk_draws(denoiser, self.cfg.seed) as reseed:
            for c in tqdm(mine, desc="FID samples", disable=not state.is_main_process, leave=False):
                chunk = chunks[c]
                reseed(chunk)
                x = sample_batch(denoiser, sample_noise(chunk, data_shape, self.cfg.seed),
                                 sample_labels(chunk, self.num_classes), self.num_classes, self.sampler, device,
                                 self.objective, precision)
                if self.cfg.vae:
                    x = decode_latents(x, self.cfg.vae, self.cfg.latent_scaling, self.cfg.vae_batch, device,
                                       to_cpu=False)
                f = batch_features(to_uint8(x), fe, device, FEATURE_BATCH)[layer]
                del x
                if feats is None:
                    feats = torch.zeros(rows, f.shape[1], device=device)
                feats[filled:filled + len(f)] = f
                index[filled:filled + len(f)] = torch.as_tensor(list(chunk), device=device)
                filled += len(f)
        if feats is None:  # no samples at all
            raise ConfigError("FID needs eval.samples >= 2; set eval.samples (or 0 for no FID)")
        feats, index = gather(feats).cpu(), gather(index).cpu()
        keep = index >= 0
        feats, index = feats[keep], index[keep]
        order = torch.argsort(index, stable=True)
        feats, index = feats[order], index[order]
        first = torch.ones(len(index), dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]  # a repeated batch's rows appear twice
        feats = feats[first]
        assert len(feats) == self.cfg.samples, (len(feats), self.cfg.samples)
        return feats

    def __call__(self, denoiser, data_shape, device) -> dict:
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list

        from tread_bench.measure.fid import load_reference, metrics_from_features

        state = PartialState()
        feats = self.sample_features(denoiser, data_shape, device)
        row = None
        if state.is_main_process:
            name, layer, fe = self.extractor(device)
            ref = load_reference(self.reference, fe, need_features=self.cfg.kid or self.cfg.prc,
                                 cuda=torch.device(device).type == "cuda")
            metrics = metrics_from_features({layer: feats}, ref, name, kid=self.cfg.kid, prc=self.cfg.prc)
            row = self.row(metrics, resolve_precision(self.precision, str(device)))
        return broadcast_object_list([row])[0] if state.num_processes > 1 else row

    def row(self, metrics: dict, precision: str) -> dict:
        """The evaluation row fragment: the metrics and the protocol that produced them."""
        guidance = (f"sparse guidance {self.cfg.sparse_guidance}" if self.cfg.sparse_guidance
                    else f"cfg {self.cfg.cfg_scale:g}" + ("" if self.cfg.uncond_rate is None
                                                          else f", uncond rate {self.cfg.uncond_rate:g}")
                    if self.cfg.cfg_scale != 1 else "none")
        sampler = f"{self.objective.sampler_name()} {precision} EMA" + (f" + {self.cfg.vae} decode" if self.cfg.vae
                                                                        else "")
        return {"fid": metrics.get("fid"), "kid": metrics.get("kid_mean"), "precision": metrics.get("precision"),
                "recall": metrics.get("recall"), "fid_samples": metrics["num_samples"], "sampler": sampler,
                "sampler_steps": self.cfg.sampler_steps, "guidance": guidance, "reference": metrics["reference"],
                "feature_extractor": metrics["feature_extractor"]}
