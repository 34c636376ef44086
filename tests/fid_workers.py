"""FID evaluations run in their own processes by tests/test_fid_scale.py: under ``accelerate launch`` (several
processes) or alone, and for peak-memory figures (a process's peak RSS is its own).

    python tests/fid_workers.py {fake|dit|memory} OUT_DIR COUNT

writes OUT_DIR/row.json (the evaluation row, rank 0) and OUT_DIR/features.npy (the gathered features, rank 0);
the row also holds the process's peak RSS (ru_maxrss), and for ``memory`` the RSS just before the evaluation and
the peak during it (VmHWM reset there), in KiB."""
import json
import os
import resource
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from tread_bench.measure.memory import reset_peak_rss

POOL = "test-stream-pool"
SEED = 12345


class PixelPool(FeatureExtractorBase):
    """48 features: 4x4 average pool of each channel of uint8 images, scaled to [0, 5]."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    autocast_seen: list = []  # whether autocast was on at each call (features are taken in fp32)

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        PixelPool.autocast_seen.append(torch.is_autocast_enabled(x.device.type))
        return (F.adaptive_avg_pool2d(x.float(), 4).flatten(1) * (5 / 255),)

    @staticmethod
    def get_provided_features_list():
        return ("pool",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "pool"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)


if POOL not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(POOL, PixelPool)


class FakeObjective:
    """A deterministic generator in the objective's place: sample = tanh(noise + class shift), per sample, through
    the denoiser (an identity), so a sample depends on its own noise and label only."""

    def __init__(self):
        self.autocast_seen = []  # (autocast on, its dtype) at each call

    def sample(self, model, noise, labels, sampler, null_label, progress=False):
        kind = noise.device.type
        self.autocast_seen.append((torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)))
        return torch.tanh(model(noise) + 0.25 * (labels.float().view(-1, 1, 1, 1) - 4.5))

    def sampler_name(self):
        return "fake tanh"


def fake_images(noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What FakeObjective makes of ``noise`` and ``labels``, written out again for the tests' hand computation."""
    return torch.tanh(noise + 0.25 * (labels.float().view(-1, 1, 1, 1) - 4.5))


def reference_images(n: int = 64, seed: int = 1) -> torch.Tensor:
    """Smooth 16x16 RGB images in [-1, 1] (upsampled 4x4 noise): the reference set."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear", align_corners=False)


def status_kib(field: str) -> int | None:
    """A memory figure of /proc/self/status (VmRSS, VmHWM) in KiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def evaluate(mode: str, out: Path, count: int) -> None:
    """One evaluation of ``count`` samples in ``mode`` on the CPU; rank 0 writes its row (and features) to ``out``."""
    from accelerate import PartialState

    from tread_bench.measure.evaluate import EvalConfig, FIDEvaluator

    state = PartialState(cpu=True)
    if mode == "dit":  # a real network (tiny DiT with TREAD) under Sparse Guidance: forced-rate draws
        from suite_helpers import build_denoiser

        shape, num_classes = (1, 16, 16), 10
        torch.manual_seed(3)  # the weights' initialisation draws from the global generator
        den = build_denoiser("dit", "tiny", shape, num_classes, routes=[{"start": 1, "end": 3, "rate": 0.5}],
                             seed=3)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():  # open the adaLN-Zero gates and the zero head: the routed tokens change the output
            for p in den.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        den.net.set_shard(state.process_index, state.num_processes)  # as the trainer leaves it
        objective = None
        cfg = EvalConfig(samples=count, batch=5, sampler_steps=3, sparse_guidance=[0.0, 0.5, 1.5], extractor=POOL)
        reference = reference_images()[:, :1]
    elif mode == "fake":
        shape, num_classes, den, objective = (3, 16, 16), 10, torch.nn.Identity(), FakeObjective()
        cfg = EvalConfig(samples=count, batch=7, extractor=POOL)
        reference = reference_images()
    elif mode == "memory":  # 3x64x64 images: 48 KiB of float32 per sample; 48 features per sample kept
        shape, num_classes, den, objective = (3, 64, 64), 10, torch.nn.Identity(), FakeObjective()
        cfg = EvalConfig(samples=count, batch=50, extractor=POOL, kid=False, prc=False)
        reference = str(out / "reference.npz")
        if state.is_main_process:
            np.savez(reference, mu=np.full(48, 2.5), sigma=np.eye(48) * 0.1)
    else:
        raise SystemExit(f"unknown mode {mode}")
    state.wait_for_everyone()
    evaluator = FIDEvaluator(cfg, reference, f"test-ref-{mode}", num_classes, objective)
    if mode == "memory":
        reset = reset_peak_rss()
        start_kib = status_kib("VmRSS")
        row = evaluator(den, shape, "cpu")
        feats = None
        row.update(start_rss_kib=start_kib, eval_peak_kib=status_kib("VmHWM") if reset else None)
    else:
        feats = evaluator.sample_features(den, shape, "cpu")
        row = evaluator(den, shape, "cpu")
    if state.is_main_process:
        row["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        row["num_processes"] = state.num_processes
        if feats is not None:
            np.save(out / "features.npy", feats.numpy())
        (out / "row.json").write_text(json.dumps(row))


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    mode, out_dir, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TREAD_FID_CACHE", str(out_dir / "fid-cache"))
    evaluate(mode, out_dir, n)
