"""Diffusion-RWKV: Bi-WKV against a literal loop of its formula, q-shift against hand-built loops,
the fewer-tokens decision (decay / current T), routing through RoutedNetwork, and trainability."""
import math

import pytest
import torch

from backbones import build_backbone
from backbones.rwkv import BiWKV, RWKVBlock, bi_wkv, bi_wkv_quadratic, q_shift
from diffusion.edm import EDMConfig, EDMDenoiser, edm_loss, sample_sigma
from routing import RoutedNetwork

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these tensors are tiny


def wkv_loop(w, u, k, v):
    """The Bi-WKV formula written out with Python floats: y_t = num_t / den_t."""
    batch, seq, chans = k.shape
    y = torch.zeros(batch, seq, chans, dtype=F64)
    for b in range(batch):
        for c in range(chans):
            wc, uc = float(w[c]), float(u[c])
            for t in range(seq):
                num = den = 0.0
                for i in range(seq):
                    logit = uc + float(k[b, t, c]) if i == t else -(abs(t - i) - 1) * wc + float(k[b, i, c])
                    num += math.exp(logit) * float(v[b, i, c])
                    den += math.exp(logit)
                y[b, t, c] = num / den
    return y


def wkv_inputs(batch, seq, decays, firsts, k_scale=3.0, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(batch, seq, len(decays), generator=g, dtype=F64) * k_scale).to(dtype)
    v = torch.randn(batch, seq, len(decays), generator=g, dtype=F64).to(dtype)
    w = torch.tensor(decays, dtype=dtype) / seq
    u = torch.tensor(firsts, dtype=dtype) / seq
    return w, u, k, v


# decays at both ends of the fancy-init range (-5, +3) and between; firsts = ln(0.3) + {-0.5, 0, 0.5}
DECAYS = [-5.0, -1.0, 0.0, 3.0]
FIRSTS = [math.log(0.3) - 0.5, math.log(0.3), math.log(0.3) + 0.5, math.log(0.3)]


@pytest.mark.parametrize("seq", [1, 2, 7, 16])
def test_bi_wkv_matches_literal_loop(seq):
    w, u, k, v = wkv_inputs(2, seq, DECAYS, FIRSTS)
    expected = wkv_loop(w, u, k, v)
    assert torch.allclose(bi_wkv(w, u, k, v), expected, rtol=0, atol=1e-10)
    assert torch.allclose(bi_wkv_quadratic(w, u, k, v), expected, rtol=0, atol=1e-10)


def test_bi_wkv_large_key_spread_matches_loop():
    # keys spread over ~+-60: without the max-k shift the float32 exponentials would overflow
    w, u, k, v = wkv_inputs(1, 12, DECAYS, FIRSTS, k_scale=30.0, seed=1)
    assert torch.allclose(bi_wkv(w, u, k, v), wkv_loop(w, u, k, v), rtol=0, atol=1e-10)
    w32, u32, k32, v32 = (t.float() for t in (w, u, k, v))
    assert torch.allclose(bi_wkv(w32, u32, k32, v32).double(), wkv_loop(w, u, k, v), atol=1e-5)


def test_bi_wkv_float32_far_beyond_init_decays():
    # a trained decay may leave -5..3: float32 stays accurate well past it (exponents <= |decay| / 2)
    w, u, k, v = wkv_inputs(2, 64, [-100.0, -40.0, 40.0, 100.0], FIRSTS, k_scale=5.0, seed=7)
    exact = bi_wkv_quadratic(w, u, k, v)
    y32 = bi_wkv(*(t.float() for t in (w, u, k, v)))
    assert torch.isfinite(y32).all() and (y32.double() - exact).abs().max() < 1e-5


def test_bi_wkv_long_sequence_stays_finite_and_accurate():
    decays = torch.linspace(-5, 3, 8).tolist()
    w, u, k, v = wkv_inputs(1, 4096, decays, [math.log(0.3)] * 8, k_scale=5.0, seed=2, dtype=torch.float32)
    y32 = bi_wkv(w, u, k, v)
    assert y32.dtype == torch.float32 and torch.isfinite(y32).all()
    y64 = bi_wkv(*(t.double() for t in (w, u, k, v)))
    assert (y32.double() - y64).abs().max() < 1e-4
    # float32 O(T) against the exact O(T^2) softmax at T=1024 (fits in memory)
    w, u, k, v = wkv_inputs(1, 1024, decays[::2], [math.log(0.3)] * 4, k_scale=5.0, seed=3, dtype=torch.float32)
    exact = bi_wkv_quadratic(*(t.double() for t in (w, u, k, v)))
    assert (bi_wkv(w, u, k, v).double() - exact).abs().max() < 1e-4


def test_bi_wkv_gradients_match_quadratic_form():
    w, u, k, v = wkv_inputs(2, 11, DECAYS, FIRSTS, seed=4)
    weight = torch.randn(2, 11, 4, dtype=F64, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (bi_wkv, bi_wkv_quadratic):
        leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
        (fn(*leaves) * weight).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for g_linear, g_quad in zip(*grads):
        assert torch.allclose(g_linear, g_quad, rtol=0, atol=1e-10)
    small = [t[:1, :5, :2].clone().requires_grad_() for t in (k, v)]
    assert torch.autograd.gradcheck(bi_wkv, (w[:2].clone().requires_grad_(), u[:2].clone().requires_grad_(), *small))


@pytest.mark.parametrize("seq", [16, 8])
def test_biwkv_module_divides_decay_by_current_length(seq):
    # the documented decision: a block handed T tokens uses w = decay / T, u = first / T
    module = BiWKV(4, layer_id=2, depth=6).double()
    _, _, k, v = wkv_inputs(1, seq, DECAYS, FIRSTS, seed=6)
    with torch.no_grad():
        out = module(k, v)
        assert torch.allclose(out, wkv_loop(module.decay / seq, module.first / seq, k, v), rtol=0, atol=1e-10)
        by_full_grid = wkv_loop(module.decay / 64, module.first / 64, k, v)
    assert (out - by_full_grid).abs().max() > 1e-3
    assert module.scan_macs(k) == 29 * 1 * seq * 4


def test_fancy_init_values():
    module = BiWKV(5, layer_id=0, depth=3)
    assert torch.allclose(module.decay, torch.tensor([-5 + 8 * (c / 4) ** 0.7 for c in range(5)]))
    assert torch.allclose(module.first, torch.tensor([math.log(0.3) + 0.5 * ((c + 1) % 3 - 1) for c in range(5)]))
    block = RWKVBlock(8, layer_id=1, depth=4)
    ramp = torch.arange(8) / 8
    assert torch.allclose(block.spatial_mix.mix_k, ramp ** 0.75)
    assert torch.allclose(block.spatial_mix.mix_v, ramp ** 0.75 + 0.1)
    assert torch.allclose(block.spatial_mix.mix_r, ramp ** 0.375)
    assert torch.allclose(block.channel_mix.mix_k, ramp ** 0.75)


def q_shift_loop(x, grid):
    """Hand-built q-shift: quarter 0 from the left, 1 from the right, 2 from above, 3 from below;
    without a grid, quarters 0/2 from the previous token and 1/3 from the next; zeros outside."""
    batch, seq, chans = x.shape
    q = chans // 4
    out = torch.zeros_like(x)
    for b in range(batch):
        for t in range(seq):
            for c in range(chans):
                quarter = c // q if c < 4 * q else 4
                if grid is None:
                    src = {0: t - 1, 1: t + 1, 2: t - 1, 3: t + 1, 4: t}[quarter]
                    if 0 <= src < seq:
                        out[b, t, c] = x[b, src, c]
                    continue
                row, col = divmod(t, grid[1])
                dr, dc = {0: (0, -1), 1: (0, 1), 2: (-1, 0), 3: (1, 0), 4: (0, 0)}[quarter]
                if 0 <= row + dr < grid[0] and 0 <= col + dc < grid[1]:
                    out[b, t, c] = x[b, (row + dr) * grid[1] + col + dc, c]
    return out


@pytest.mark.parametrize("grid", [(3, 5), (1, 6), (4, 1), None])
def test_q_shift_matches_loop(grid):
    seq = grid[0] * grid[1] if grid else 7
    x = torch.randn(2, seq, 10, dtype=F64)  # 10 channels: quarters of 2, two unshifted channels
    assert torch.equal(q_shift(x, grid), q_shift_loop(x, grid))


def test_q_shift_rejects_mismatched_grid():
    with pytest.raises(ValueError, match="does not hold"):
        q_shift(torch.randn(1, 12, 8), (3, 5))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_backbone("rwkv", "tiny", in_channels=1, num_classes=10)


def open_gates(model, seed=1):
    """adaLN-Zero starts every branch closed; randomise the modulation so the blocks matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            layer = block.adaLN_modulation[-1]
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)
        head = model.final_layer.linear  # zero-initialised too: the output would ignore the blocks
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.05)
    return model


def batch_inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 32, 32, generator=g), torch.randn(n, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_registered_sizes_and_protocol():
    model = tiny_model()
    assert model.scan_mixing and model.grid_size == (8, 8) and model.depth == 6 and model.hidden_size == 64
    assert RoutedNetwork(model, [dict(start=1, end=3, rate=0.5)]).selection == "rows"
    from backbones import backbone_sizes
    assert {k: (v["depth"], v["hidden_size"]) for k, v in backbone_sizes("rwkv").items() if k not in ("tiny", "XS/4")} == {
        "S/2": (12, 384), "B/2": (12, 768), "L/2": (24, 1024), "XL/2": (28, 1152)}


@pytest.mark.parametrize("selection", [None, "rows", "random"])
def test_forward_shapes(selection):
    model = open_gates(tiny_model())
    x, noise, labels = batch_inputs()
    if selection is None:
        out = model(x, noise, labels)
    else:
        net = RoutedNetwork(model, [dict(start=1, end=3, rate=0.5)], selection=selection).train()
        out = net(x, noise, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bf16_autocast_forward_runs_wkv_in_float32():
    model = open_gates(tiny_model())
    net = RoutedNetwork(model, [dict(start=1, end=3, rate=0.5)]).train()
    x, noise, labels = batch_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, noise, labels)
    reference = net.eval()(x, noise, labels, force_rate=0.0)
    assert out.shape == x.shape and torch.isfinite(out).all() and torch.isfinite(reference).all()


def test_rate_zero_equals_unrouted_exactly():
    model = open_gates(tiny_model())
    x, noise, labels = batch_inputs()
    net = RoutedNetwork(model, [dict(start=1, end=3, rate=0.0)]).train()
    assert torch.equal(net(x, noise, labels), model(x, noise, labels))


@pytest.mark.parametrize("selection, expected_grid", [("rows", (4, 8)), ("random", None)])
def test_routed_blocks_use_kept_grid_and_current_length(selection, expected_grid):
    model = open_gates(tiny_model()).double()
    block_calls, wkv_calls = {}, []
    for idx, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, args, out, idx=idx: block_calls.update({idx: (args[2], args[0].shape[1])}))
        block.spatial_mix.wkv.register_forward_hook(lambda mod, args, out, idx=idx: wkv_calls.append((idx, args, out)))
    net = RoutedNetwork(model, [dict(start=1, end=3, rate=0.5)], selection=selection).train()
    x, noise, labels = batch_inputs(2)
    with torch.no_grad():
        net(x.double(), noise.double(), labels)
    assert block_calls[0] == block_calls[4] == ((8, 8), 64)
    assert block_calls[1] == block_calls[3] == (expected_grid, 32)
    assert len(wkv_calls) == 6
    for idx, (k, v), out in wkv_calls:  # inside the route: w = decay / 32, not decay / 64
        seq = k.shape[1]
        assert seq == (32 if 1 <= idx <= 3 else 64)
        wkv = model.blocks[idx].spatial_mix.wkv
        expected = bi_wkv_quadratic(wkv.decay / seq, wkv.first / seq, k, v)
        assert torch.allclose(out, expected, rtol=0, atol=1e-10)


def test_gradients_finite_and_reach_every_block():
    model = open_gates(tiny_model())
    net = RoutedNetwork(model, [dict(start=1, end=3, rate=0.5)]).train()
    x, noise, labels = batch_inputs()
    net(x, noise, labels).square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    for block in model.blocks:
        assert block.spatial_mix.wkv.decay.grad.abs().sum() > 0
        assert block.channel_mix.key.weight.grad.abs().sum() > 0


def overfit_fixed_batch(routes, steps, selection="auto"):
    """Adam on 8 fixed 32x32x1 images with fixed sigma and noise draws; full-network loss before/after."""
    model = tiny_model(seed=3)
    net = RoutedNetwork(model, routes, selection=selection, seed=7)
    denoiser = EDMDenoiser(net)
    g = torch.Generator().manual_seed(11)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    freqs = torch.rand(8, 2, generator=g) * 4 + 1
    images = torch.sin(freqs[:, :1, None] * math.pi * xx + freqs[:, 1:, None] * math.pi * yy)[:, None] * 0.5
    labels = torch.arange(8) % 10
    sigma = sample_sigma(8, EDMConfig(), generator=g)
    noise = torch.randn(images.shape, generator=g)

    def full_loss():
        net.eval()
        with torch.no_grad():
            return edm_loss(denoiser, images, labels, sigma, noise).mean().item()

    before = full_loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        edm_loss(denoiser, images, labels, sigma, noise).mean().backward()
        opt.step()
    gates_moved = all(b.adaLN_modulation[-1].weight.abs().sum() > 0 for b in model.blocks)
    return before, full_loss(), gates_moved


ROUTE = [dict(start=1, end=3, rate=0.5)]


@pytest.mark.parametrize("routes, selection", [([], "auto"), (ROUTE, "rows"), (ROUTE, "random")])
def test_few_adam_steps_lower_the_loss(routes, selection):
    before, after, gates_moved = overfit_fixed_batch(routes, steps=20, selection=selection)
    assert after < 0.6 * before and gates_moved


@pytest.mark.slow
@pytest.mark.parametrize("routes, selection", [([], "auto"), (ROUTE, "rows"), (ROUTE, "random")])
def test_training_lowers_the_loss(routes, selection):
    before, after, gates_moved = overfit_fixed_batch(routes, steps=300, selection=selection)
    assert after < 0.01 * before and gates_moved
