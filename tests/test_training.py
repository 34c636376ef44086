"""Training actually learns: a few hundred steps on a fixed small batch drive the loss down."""
import pytest
import torch

from tread_bench.data import load_dataset
from diffusion.edm import edm_loss, sample_sigma, EDMConfig
from suite_helpers import build_denoiser


def fixed_batch_loss_drop(routes, steps):
    torch.manual_seed(0)
    data = load_dataset("fashion_mnist", 32, limit=8)
    den = build_denoiser("dit", "tiny", data.shape, data.num_classes, routes=routes, seed=0)
    g = torch.Generator().manual_seed(1)
    sigma, noise = sample_sigma(64, EDMConfig(), g), torch.randn(64, *data.shape, generator=g)
    x, y = data.images.repeat(8, 1, 1, 1), data.labels.repeat(8)

    def eval_loss():  # full network, fixed draws: comparable before and after
        den.eval()
        with torch.no_grad():
            return edm_loss(den, x, y, sigma, noise).mean().item()

    opt = torch.optim.Adam(den.parameters(), lr=1e-3)
    before = eval_loss()
    for step in range(steps):
        den.train()
        i = torch.arange(8) + 8 * (step % 8)
        loss = edm_loss(den, x[i], y[i], sigma[i], noise[i]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, eval_loss()


@pytest.mark.parametrize("routes", [[], [{"start": 1, "end": 3, "rate": 0.5}]], ids=["baseline", "tread"])
def test_loss_goes_down_on_a_fixed_batch(routes):
    before, after = fixed_batch_loss_drop(routes, steps=200)
    assert after < 0.5 * before, (before, after)
