"""Mamba backbone: the chunked parallel scan against a literal loop of the recurrence, the causal
conv against a loop, mamba_ssm's parameter layout, a second implementation (mambapy), routing
through RoutedNetwork, and trainability."""
import math

import pytest
import torch
from torch.nn import functional as F

import backbones.mamba as mamba
from backbones import build_backbone, mamba_cpu
from backbones.mamba import BidirectionalMambaBlock, MambaMixer, causal_depthwise_conv1d, selective_scan
from diffusion.edm import EDMDenoiser, edm_loss
from routing import RoutedNetwork

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are small: one intra-op thread skips the per-op thread synchronisation, which
    dominates (and on a shared, oversubscribed CPU costs ~20x) at this size."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scan_loop(a, b, reverse=False):
    """h[t] = a[t] h[t-1] + b[t] (or h[t+1] when reverse), one step at a time."""
    h, state = torch.zeros_like(b), torch.zeros_like(b[0])
    steps = range(b.shape[0] - 1, -1, -1) if reverse else range(b.shape[0])
    for t in steps:
        state = a[t] * state + b[t]
        h[t] = state
    return h


def selective_scan_loop(u, delta, A, B, C, D, z, delta_bias):
    """The selective-scan recurrence written out per time step (layout of mamba_ssm: (B, D, L))."""
    dt = F.softplus(delta + delta_bias[:, None])
    state = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[2]):
        state = torch.exp(dt[:, :, t, None] * A) * state + dt[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((state * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, dim=-1) + u * D[:, None]) * F.silu(z)


def scan_inputs(batch, channels, states, length, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=F64).to(dtype)  # noqa: E731
    A = -torch.exp(r(channels, states))  # negative real, as -exp(A_log)
    return [r(batch, channels, length), r(batch, channels, length), A, r(batch, states, length),
            r(batch, states, length), r(channels), r(batch, channels, length), r(channels)]


@pytest.mark.parametrize("length", [1, 2, 3, 7, 16, 17, 50])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_linear_scan_matches_loop(length, reverse):
    g = torch.Generator().manual_seed(length)
    a = torch.rand(length, 3, 5, generator=g, dtype=F64) * 1.2  # some decays > 1: errors would grow
    b = torch.randn(length, 3, 5, generator=g, dtype=F64)
    expected = scan_loop(a, b, reverse)
    assert torch.allclose(mamba._linear_scan_(a, b.clone(), reverse), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 16, 17, 50])
@pytest.mark.parametrize("reverse", [False, True])
def test_sequential_linear_scan_matches_loop(length, reverse):
    # the CPU path's scan (one op per step); the chunked one above runs on other devices
    g = torch.Generator().manual_seed(length)
    a = torch.rand(length, 3, 5, generator=g, dtype=F64) * 1.2
    b = torch.randn(length, 3, 5, generator=g, dtype=F64)
    expected = scan_loop(a, b, reverse)
    assert torch.allclose(mamba._sequential_scan_(a, b.clone(), reverse), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scan", ["sequential", "chunked"])
@pytest.mark.parametrize("length,slab,block", [(1, 1 << 20, 256), (5, 1 << 20, 256), (37, 1 << 20, 256),
                                               (37, 2 * 4 * 7 * 5, 8), (37, 2 * 4 * 7 * 2, 8),
                                               (37, 2 * 4 * 2, 8)])
def test_selective_scan_matches_sequential_recurrence(length, slab, block, scan, monkeypatch):
    # Batch 2, 7 channels, 4 states: one step holds 56 elements. The last three cases tile the work as
    # the CPU path does for long sequences: time blocks of 5 steps (5, ..., 5, 2; the state carried
    # across), of 2 steps, and of 1 step x channel slabs of 2 (2, 2, 2, 1). "chunked" runs the
    # chunked scan (what other devices use) on CPU.
    monkeypatch.setattr(mamba, "_SLAB_ELEMENTS", slab)
    monkeypatch.setattr(mamba, "_TIME_BLOCK", block)
    if scan == "chunked":
        monkeypatch.setattr(mamba, "_scan_", mamba._linear_scan_)
    inputs = [t.requires_grad_() for t in scan_inputs(2, 7, 4, length)]
    u, delta, A, B, C, D, z, bias = inputs
    ours = selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, cpu_kernel=False)
    expected = selective_scan_loop(*inputs)
    assert torch.allclose(ours, expected, rtol=1e-10, atol=1e-12)
    grad_out = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for name, got, want in zip("u delta A B C D z delta_bias".split(), ours_grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-11), name


# "kernel": the fused C++ CPU scan (backbones/mamba_cpu.py), skipped where it does not build.
CPU_KERNEL = pytest.param(True, id="kernel", marks=pytest.mark.skipif(
    mamba_cpu.load() is None, reason="the fused CPU scan did not build (no C++ compiler?)"))
PATHS = [pytest.param(False, id="pure"), CPU_KERNEL]


@pytest.mark.parametrize("cpu_kernel", PATHS)
def test_selective_scan_gradcheck(cpu_kernel):
    inputs = [t.requires_grad_() for t in scan_inputs(1, 3, 2, 6, seed=3)]
    fn = lambda u, d, A, B, C, D, z, bias: selective_scan(u, d, A, B, C, D, z=z, delta_bias=bias,  # noqa: E731
                                                          cpu_kernel=cpu_kernel)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("cpu_kernel", PATHS)
def test_selective_scan_float32_and_large_steps_stay_finite(cpu_kernel):
    # dt up to ~softplus(40) with A down to -e^3: decays underflow to 0; the scan only multiplies them.
    u, delta, A, B, C, D, z, bias = scan_inputs(2, 6, 4, 64, seed=4, dtype=torch.float32)
    out = selective_scan(u, delta * 20, A, B, C, D, z=z, delta_bias=bias, cpu_kernel=cpu_kernel)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    expected = selective_scan_loop(*(t.double() for t in (u, delta * 20, A, B, C, D, z, bias)))
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_causal_depthwise_conv_matches_loop():
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(2, 5, 9, generator=g, dtype=F64), torch.randn(5, 1, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    expected = torch.zeros_like(x)
    for b in range(2):
        for d in range(5):
            for t in range(9):
                acc = float(bias[d])
                for k in range(4):  # tap k sees input t - 3 + k; inputs before 0 are zero
                    if t - 3 + k >= 0:
                        acc += float(w[d, 0, k]) * float(x[b, d, t - 3 + k])
                expected[b, d, t] = acc
    assert torch.allclose(causal_depthwise_conv1d(x, w, bias), expected, atol=1e-12)


@pytest.mark.parametrize("d_model", [64, 384])
def test_mixer_parameters_are_mamba_ssm_layout(d_model):
    # As mamba_ssm.Mamba: D = 2 d_model, dt_rank = ceil(d_model/16), N = 16, W = 4,
    # in_proj and out_proj without bias, conv1d and dt_proj with bias.
    inner, rank = 2 * d_model, math.ceil(d_model / 16)
    expected = {
        "in_proj.weight": (2 * inner, d_model),
        "conv1d.weight": (inner, 1, 4),
        "conv1d.bias": (inner,),
        "x_proj.weight": (rank + 32, inner),
        "dt_proj.weight": (inner, rank),
        "dt_proj.bias": (inner,),
        "A_log": (inner, 16),
        "D": (inner,),
        "out_proj.weight": (d_model, inner),
    }
    mixer = MambaMixer(d_model)
    assert {n: tuple(p.shape) for n, p in mixer.named_parameters()} == expected
    # mamba_ssm's init: A = 1..N per channel, D = 1, softplus(dt bias) log-uniform in [1e-3, 0.1].
    assert torch.allclose(mixer.A_log, torch.log(torch.arange(1, 17.0)).expand(inner, 16))
    assert torch.equal(mixer.D.detach(), torch.ones(inner))
    dt = F.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert mixer.dt_proj.weight.abs().max() <= rank ** -0.5


@pytest.mark.parametrize("cpu_kernel", PATHS)
def test_mixer_matches_mambapy_with_the_same_state_dict(cpu_kernel):
    mambapy = pytest.importorskip("mambapy.mamba", reason="mambapy (dev extra) is the second implementation")
    torch.manual_seed(0)
    ours = MambaMixer(32, use_fused_kernels=cpu_kernel).double()
    theirs = mambapy.MambaBlock(mambapy.MambaConfig(d_model=32, n_layers=1, pscan=True)).double()
    theirs.load_state_dict(ours.state_dict())  # the same names and shapes load strictly
    with torch.no_grad():
        ours.A_log.add_(torch.rand_like(ours.A_log))  # move off the init, where the two agree trivially
        theirs.A_log.copy_(ours.A_log)
    x = torch.randn(2, 32, 32, dtype=F64)
    assert torch.allclose(ours(x), theirs(x), rtol=1e-9, atol=1e-11)


def test_mixer_is_causal_and_block_is_bidirectional():
    torch.manual_seed(0)
    block = BidirectionalMambaBlock(16)
    nn_init_gates(block)
    x, c = torch.randn(1, 10, 16), torch.randn(1, 16)
    x2 = x.clone()
    x2[:, 6] += torch.randn(16)  # not a constant shift: the block's LayerNorm would remove it
    mix = block.forward_mixer
    assert torch.equal(mix(x)[:, :6], mix(x2)[:, :6])  # causal: earlier outputs ignore token 6
    assert not torch.allclose(mix(x)[:, 6:], mix(x2)[:, 6:])
    assert not torch.allclose(block(x, c)[:, :6], block(x2, c)[:, :6])  # the backward scan sees it


def test_scan_macs_is_the_common_estimate():
    mixer = MambaMixer(64)
    assert mixer.scan_macs(torch.zeros(3, 50, 64)) == 9 * 3 * 50 * 128 * 16


def nn_init_gates(module):
    """Open the adaLN-Zero gates and the zero-initialised final layer so that every block counts."""
    g = torch.Generator().manual_seed(1)
    for name, p in module.named_parameters():
        if "adaLN_modulation" in name or "final_layer.linear" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1


def tiny(num_classes=10):
    torch.manual_seed(0)
    model = build_backbone("mamba", "tiny", input_size=32, in_channels=4, num_classes=num_classes)
    nn_init_gates(model)
    return model


def batch(size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 4, 32, 32, generator=g), torch.randn(size, generator=g),
            torch.randint(0, 10, (size,), generator=g))


def test_registered_sizes_and_paper_scale():
    model = tiny()
    assert model.scan_mixing and model.depth == 6 and model.grid_size == (8, 8) and model.hidden_size == 64
    with torch.device("meta"):  # B/2 is the paper-scale Mamba (111M): count without allocating
        base = build_backbone("mamba", "B/2")
    count = sum(p.numel() for p in base.parameters())
    assert 105e6 < count < 120e6, count


@pytest.mark.parametrize("selection", ["rows", "random"])
def test_routed_forward_shapes_and_grads(selection):
    model = tiny()
    net = RoutedNetwork(model, routes=[{"start": 1, "end": 3, "rate": 0.5}], selection=selection).train()
    x, t, y = batch()
    out = net(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, model(x, t, y))  # half the tokens skipped blocks 1..3
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[2].forward_mixer.A_log.grad.abs().sum() > 0


def test_rate_zero_equals_unrouted_exactly():
    model = tiny()
    x, t, y = batch()
    net = RoutedNetwork(model, routes=[{"start": 1, "end": 3, "rate": 0.0}]).train()
    assert torch.equal(net(x, t, y), model(x, t, y))
    assert model(x, t, y).shape == x.shape


def test_bf16_autocast_runs_on_cpu():
    model = tiny()
    x, t, y = batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


def train_losses(routed: bool, steps: int, lr: float = 2e-3):
    torch.manual_seed(0)
    model = build_backbone("mamba", "tiny", input_size=32, in_channels=4, num_classes=10)
    routes = [{"start": 1, "end": 3, "rate": 0.5}] if routed else []
    denoiser = EDMDenoiser(RoutedNetwork(model, routes=routes)).train()
    x, _, labels = batch(4, seed=1)
    g = torch.Generator().manual_seed(2)
    sigma = torch.exp(torch.randn(4, generator=g) * 0.5 - 0.5)  # fixed noise levels and noise
    noise = torch.randn(x.shape, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = edm_loss(denoiser, x, labels, sigma, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("routed", [False, True])
def test_short_training_lowers_the_loss(routed):
    losses = train_losses(routed, steps=15)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("routed", [False, True])
def test_training_a_few_hundred_steps_lowers_the_loss(routed):
    losses = train_losses(routed, steps=200)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-20:]) / 20 < 0.4 * losses[0], (losses[0], losses[-20:])


@pytest.mark.skipif(not (torch.cuda.is_available() and mamba.fused_kernels() is not None),
                    reason="needs CUDA and importable mamba_ssm + causal_conv1d (the fused kernels)")
def test_fused_kernels_match_the_pure_path():
    torch.manual_seed(0)
    mixer = MambaMixer(64).cuda()
    x = torch.randn(2, 100, 64, device="cuda", requires_grad=True)
    results = []
    for fused in (True, False):
        mixer.use_fused_kernels = fused
        out = mixer(x)
        grads = torch.autograd.grad(out.square().sum(), [x] + list(mixer.parameters()))
        results.append((out, grads))
    (out_f, grads_f), (out_p, grads_p) = results
    assert torch.allclose(out_f, out_p, rtol=1e-3, atol=1e-4)
    for gf, gp in zip(grads_f, grads_p):
        assert torch.allclose(gf, gp, rtol=1e-2, atol=1e-3)
