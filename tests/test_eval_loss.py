"""Held-out evaluation loss: equal to a literal loop, fixed across calls and across a resume."""
import math

import pytest
import torch

from tread_bench.data.datasets import make_synthetic
from diffusion.edm import loss_weight
from tread_bench.training.trainer import Trainer, TrainConfig
from suite_helpers import build_denoiser
from diffusion.edm import quantile_sigmas
from tread_bench.measure.eval_loss import EvalLossConfig, HeldOutLoss


def perturbed_denoiser(routes=(), seed=0):
    torch.manual_seed(seed)
    den = build_denoiser("dit", "tiny", (1, 32, 32), 4, routes)
    with torch.no_grad():  # open the adaLN-Zero gates and the zero head, so the network output matters
        for p in den.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return den


def test_quantile_sigmas_by_hand():
    # two levels: the 25% and 75% quantiles of N(-1.2, 1.2^2) are -1.2 -+ 1.2 * 0.6744898
    s = quantile_sigmas(2)
    assert s[0].item() == pytest.approx(math.exp(-1.2 - 1.2 * 0.6744898), rel=1e-6)
    assert s[1].item() == pytest.approx(math.exp(-1.2 + 1.2 * 0.6744898), rel=1e-6)


def test_equals_literal_loop_over_images_and_levels():
    data = make_synthetic(12, 32, 1, 4)
    loss = HeldOutLoss(data.images, data.labels, EvalLossConfig(images=10, levels=3, batch=4))
    den = perturbed_denoiser().eval()
    got = loss(den)
    per_level = []
    with torch.no_grad():
        for k, sigma in enumerate(loss.sigmas.tolist()):
            total = 0.0
            for i in range(10):  # one image at a time: D(x + sigma n), lambda(sigma) * mean squared error
                x, n = data.images[i:i + 1], loss.noise[k, i:i + 1]
                d = den(x + sigma * n, torch.tensor([sigma]), data.labels[i:i + 1])
                total += float(loss_weight(torch.tensor(sigma)) * ((d - x) ** 2).mean())
            per_level.append(total / 10)
    assert got["eval_loss"] == pytest.approx(sum(per_level) / 3, rel=1e-5)
    for name, value in zip(loss.column_names(), per_level):
        assert got[name] == pytest.approx(value, rel=1e-5)


def test_identical_across_calls_and_unrouted():
    data = make_synthetic(16, 32, 1, 4)
    loss = HeldOutLoss(data.images, data.labels, EvalLossConfig(images=16, levels=4, batch=8))
    den = perturbed_denoiser()
    first, second = loss(den), loss(den)
    assert first == second
    assert den.training  # the mode is restored
    routed = perturbed_denoiser(routes=[{"start": 1, "end": 3, "rate": 0.5}])
    assert loss(routed) == first  # evaluation runs the full network: same weights, same value


def test_identical_across_resume(tmp_path):
    data = make_synthetic(64, 32, 1, 4)
    loss = HeldOutLoss(data.images, data.labels, EvalLossConfig(images=16, levels=4, batch=16))
    cfg = TrainConfig(steps=4, global_batch=8, lr=1e-3, ema_decay=0.5, checkpoint_every=2, log_every=2)
    torch.manual_seed(0)
    trainer = Trainer(build_denoiser("dit", "tiny", (1, 32, 32), 4), data, cfg, tmp_path)
    trainer.train()
    before = loss(trainer.ema_denoiser)
    torch.manual_seed(1)  # a different init: the resumed weights must overwrite it
    resumed = Trainer(build_denoiser("dit", "tiny", (1, 32, 32), 4), data, cfg, tmp_path)
    assert resumed.try_resume()
    assert loss(resumed.ema_denoiser) == before
    assert before["eval_loss"] != loss(build_denoiser("dit", "tiny", (1, 32, 32), 4))["eval_loss"]
