"""EDM coefficients against hand-worked values; Heun sampler against a Gaussian's exact denoiser."""
import math

import pytest
import torch

from diffusion import SamplerConfig
from diffusion.edm import heun_sample, loss_weight, precond_coefficients, sigma_steps
from diffusion.edm import EDMDenoiser, edm_loss
from diffusion.sampler import guided_denoise

# sigma_data = 0.5. Worked by hand, e.g. sigma = 1: c_skip = .25/1.25 = .2, c_out = .5/sqrt(1.25),
# c_in = 1/sqrt(1.25), c_noise = ln(1)/4 = 0, weight = 1.25/.25 = 5.
HAND = {
    0.5: (0.5, 0.3535533906, 1.4142135624, -0.1732867951, 8.0),
    1.0: (0.2, 0.4472135955, 0.8944271910, 0.0, 5.0),
    2.0: (0.0588235294, 0.4850712501, 0.4850712501, 0.1732867951, 4.25),
}


@pytest.mark.parametrize("sigma", sorted(HAND))
def test_preconditioning_matches_hand_values(sigma):
    got = precond_coefficients(torch.tensor(sigma, dtype=torch.float64)) + (loss_weight(torch.tensor(sigma, dtype=torch.float64)),)
    for g, h in zip(got, HAND[sigma]):
        assert g.item() == pytest.approx(h, abs=1e-9)


def test_sigma_schedule_endpoints_and_rho_formula():
    cfg = SamplerConfig(steps=40)
    t = sigma_steps(cfg)
    assert len(t) == 41 and t[-1] == 0
    assert t[0].item() == pytest.approx(80.0) and t[39].item() == pytest.approx(0.002)
    i = 17  # EDM's rho = 7 schedule (Karras et al. 2022, eq. 5), evaluated literally
    lit = (80 ** (1 / 7) + i / 39 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert t[i].item() == pytest.approx(lit, rel=1e-12)


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of N(mu, s^2): D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, sigma, labels, **kw):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x.double() - self.mu)


def test_heun_with_exact_denoiser_reproduces_the_gaussian():
    mu, s = 0.3, 0.7
    noise = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = heun_sample(GaussianDenoiser(mu, s), noise, torch.zeros(20000, dtype=torch.long), SamplerConfig(steps=40),
                    null_label=0)
    # The ODE maps N(0, 80^2) onto N(mu, s^2) exactly; the sample mean/std carry Monte-Carlo error
    # of about s/sqrt(n) = 0.005 and the 40-step discretisation much less.
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(s, rel=0.02)


class LabelledDenoiser(torch.nn.Module):
    """Returns a value that encodes the label and the forced rate, to check how guidance combines passes."""

    def forward(self, x, sigma, labels, force_rate=None):
        rate = 0.0 if force_rate is None else force_rate
        return torch.zeros_like(x) + labels.view(-1, 1, 1, 1).float() * 10 + rate


def test_classifier_free_guidance_formula():
    x, labels = torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.tensor([3, 5])
    out = guided_denoise(LabelledDenoiser(), x, torch.tensor(1.0), labels, SamplerConfig(cfg_scale=4.0), null_label=10)
    # uncond = 100, cond = 30 / 50 -> 100 + 4 (cond - 100)
    assert out[:, 0, 0, 0].tolist() == [100 + 4 * (30 - 100), 100 + 4 * (50 - 100)]


def test_sparse_guidance_formula_and_reductions():
    x, labels = torch.zeros(1, 1, 2, 2, dtype=torch.float64), torch.tensor([1])
    den = LabelledDenoiser()
    out = guided_denoise(den, x, torch.tensor(1.0), labels, SamplerConfig(sparse_guidance=(0.3, 0.7, 1.5)), 10)
    assert out[0, 0, 0, 0].item() == pytest.approx(10.7 + 1.5 * (10.3 - 10.7))
    same = guided_denoise(den, x, torch.tensor(1.0), labels, SamplerConfig(sparse_guidance=(0.4, 0.4, 3.0)), 10)
    plain = guided_denoise(den, x, torch.tensor(1.0), labels, SamplerConfig(route_rate=0.4), 10)
    assert torch.equal(same, plain)  # g1 == g2 is plain routed sampling
    s_one = guided_denoise(den, x, torch.tensor(1.0), labels, SamplerConfig(sparse_guidance=(0.3, 0.7, 1.0)), 10)
    assert s_one[0, 0, 0, 0].item() == pytest.approx(10.3)  # s = 1 is the g1 pass


def test_sparse_guidance_worked_example_is_the_official_formula_with_and_without_labels():
    """Stub prediction: 2 at the strong rate 0.3, -1 at the weak rate 0.7, plus label / 100. The official
    sample_tread (CompVis/tread rf.py) combines vtheta2 + cfg_scale (vtheta1 - vtheta2), vtheta1 at gamma1,
    vtheta2 at gamma2; by hand with gamma1 = 0.3, gamma2 = 0.7, cfg_scale = 1.5."""
    calls = []

    def stub(x, sigma, labels, force_rate=None):
        calls.append((labels.tolist(), force_rate))
        return torch.zeros_like(x) + {0.3: 2.0, 0.7: -1.0}[force_rate] + labels.view(-1, 1, 1, 1) / 100

    x = torch.zeros(2, 1, 2, 2)
    cfg = SamplerConfig(sparse_guidance=(0.3, 0.7, 1.5))
    # labels kept in both branches (the paper's rule): strong 2.03 / 2.05, weak -0.97 / -0.95
    out = guided_denoise(stub, x, torch.tensor(1.0), torch.tensor([3, 5]), cfg, null_label=10)
    assert calls == [([3, 5], 0.3), ([3, 5], 0.7)]  # two passes, one per rate, labels not dropped
    assert out.dtype == torch.float64 and out.shape == x.shape
    hand = [-0.97 + 1.5 * (2.03 - -0.97)] * 4 + [-0.95 + 1.5 * (2.05 - -0.95)] * 4
    assert out[:, 0].flatten().tolist() == pytest.approx(hand)
    assert out[:, 0, 0, 0].tolist() == pytest.approx([3.53, 3.55])
    # the official code as shipped drops the label in both branches: given the null label, 2.10 and -0.90
    calls.clear()
    null = guided_denoise(stub, x, torch.tensor(1.0), torch.tensor([10, 10]), cfg, null_label=10)
    assert calls == [([10, 10], 0.3), ([10, 10], 0.7)]
    assert null[:, 0, 0, 0].tolist() == pytest.approx([-0.90 + 1.5 * (2.10 - -0.90)] * 2)
    assert null[:, 0, 0, 0].tolist() == pytest.approx([3.60, 3.60])


class IdentityNet(torch.nn.Module):
    def forward(self, x, c_noise, labels):
        return torch.zeros_like(x)


def test_edm_loss_of_zero_network_is_hand_computable():
    # F = 0  =>  D = c_skip (x + sigma n);  loss = w(sigma) * mean((c_skip (x + sigma n) - x)^2)
    x = torch.full((1, 1, 2, 2), 0.5)
    n = torch.ones_like(x)
    sigma = torch.tensor([1.0])
    got = edm_loss(EDMDenoiser(IdentityNet()), x, torch.zeros(1, dtype=torch.long), sigma, n)
    expected = 5.0 * (0.2 * (0.5 + 1.0) - 0.5) ** 2
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert math.isfinite(got.item())
