"""The v1 route-aware loss: EDM loss over the pixels of tokens each route processed, averaged over routes."""
import pytest
import torch

from diffusion.edm import EDMDenoiser, edm_loss, loss_weight
from routing import RoutedNetwork, Route
from toy_backbones import AdditiveStack


def test_route_aware_loss_equals_a_literal_masked_average():
    stack = AdditiveStack(depth=6, rows=4, cols=4).double()
    for k, blk in enumerate(stack.blocks):
        blk.c.data.fill_(0.01 * (k + 1))
    net = RoutedNetwork(stack, [Route(1, 2, 0.5), Route(3, 4, 0.25)], seed=5).train()
    den = EDMDenoiser(net)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.7, 1.9], dtype=torch.float64)
    got = edm_loss(den, x, torch.zeros(2, dtype=torch.long), sigma, noise, route_aware=True)
    # redo the same forward with the same selection draws, then average by hand
    net.generator.manual_seed(5)
    denoised, masks = den(x + noise * sigma.view(-1, 1, 1, 1), sigma, torch.zeros(2, dtype=torch.long),
                          return_token_masks=True)
    for b in range(2):
        per_route = []
        for m in masks:
            vals = [loss_weight(sigma[b]) * (denoised[b, 0, i, j] - x[b, 0, i, j]) ** 2
                    for i in range(4) for j in range(4) if m[b, i, j]]
            per_route.append(sum(vals) / len(vals))
        assert got[b].item() == pytest.approx(float(sum(per_route) / 2), rel=1e-10)
    plain = edm_loss(den, x, torch.zeros(2, dtype=torch.long), sigma, noise)
    assert not torch.allclose(plain, got)
