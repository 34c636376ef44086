"""MAC counting: both counters against hand-worked formulas, scan hooks, routing, published DiT figures."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from backbones import build_backbone, list_backbones
from tread_bench.measure import flops
from routing import RoutedNetwork

# Tiny DiT of the tests: 6 blocks, width 64, 4 heads, patch 4 on 32x32x4 -> 8x8 = 64 tokens.
D, DEPTH, PATCH, CH, N = 64, 6, 4, 4, 64
DATA = dict(input_size=32, in_channels=CH, num_classes=10)


def both(module, *inputs, **kwargs):
    """(fvcore result, torch result) for one call of ``module``."""
    return flops.fvcore_macs(module, inputs, kwargs), flops.torch_macs(module, inputs, kwargs)


# ---------------------------------------------------------------------------------------------
# single layers against hand formulas
# ---------------------------------------------------------------------------------------------

def test_linear_macs_match_rows_times_in_times_out():
    layer = nn.Linear(24, 40)  # bias adds are not multiply-adds
    by_fvcore, by_torch = both(layer, torch.zeros(2, 10, 24))
    assert by_fvcore["macs"] == by_torch["macs"] == 2 * 10 * 24 * 40


class CrossAttention(nn.Module):
    """q from x (Lq tokens), k and v from ctx (Lk tokens), SDPA with `heads` heads."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.q, self.kv = heads, nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)

    def forward(self, x, ctx):
        def split(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k, v = self.kv(ctx).chunk(2, dim=-1)
        return F.scaled_dot_product_attention(split(self.q(x)), split(k), split(v)).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_attention_macs_count_qk_and_av(device):
    batch, lq, lk, dim, heads = 2, 5, 7, 48, 3
    with torch.device(device):
        attn = CrossAttention(dim, heads)
    x, ctx = torch.zeros(batch, lq, dim, device=device), torch.zeros(batch, lk, dim, device=device)
    projections = batch * (lq * dim * dim + lk * dim * 2 * dim)
    qk_and_av = 2 * batch * heads * lq * lk * (dim // heads)
    by_fvcore, by_torch = both(attn, x, ctx)
    assert by_torch["macs"] == projections + qk_and_av  # on CPU too: counted under the MATH backend
    assert by_fvcore["macs"] == projections + qk_and_av
    assert flops.sdpa_macs((batch, heads, lq, 16), (batch, heads, lk, 16), (batch, heads, lk, 16)) == qk_and_av


# ---------------------------------------------------------------------------------------------
# scan hooks
# ---------------------------------------------------------------------------------------------

class ElementwiseScan(nn.Module):
    """A linear projection (a child: counted) and a cumulative-product scan (element-wise: not counted)."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, gate):
        h = self.proj(x)
        return torch.cumsum(h * torch.sigmoid(gate), dim=1) * h

    def scan_macs(self, x):  # takes fewer inputs than forward: only the first is passed
        return 7 * x.shape[0] * x.shape[1] * x.shape[2]


class _MatmulReadout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, c):
        return torch.matmul(h, c.unsqueeze(-1)).squeeze(-1)  # runs in no-grad mode: part of the kernel

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


class FunctionScan(nn.Module):
    """A scan whose body is an autograd Function containing a matmul, and a functional projection
    outside it (which both counters must still count)."""

    def __init__(self, dim, state):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim * state, dim))
        self.dim, self.state = dim, state

    def forward(self, x, c):
        h = F.linear(x, self.weight).unflatten(-1, (self.dim, self.state))
        return _MatmulReadout.apply(h, c)

    def scan_macs(self, *inputs):
        return 9 * inputs[0].shape[1] * self.dim * self.state


class TwoScans(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scan, self.head = ElementwiseScan(dim), nn.Linear(dim, 3)

    def forward(self, x, gate):
        return self.head(self.scan(self.scan(x, gate), gate))  # the scan module runs twice


def test_scan_macs_are_added_once_per_call():
    b, length, dim = 2, 6, 8
    net = TwoScans(dim)
    by_fvcore, by_torch = both(net, torch.zeros(b, length, dim), torch.zeros(b, length, dim))
    scans = 2 * 7 * b * length * dim
    counted = 2 * b * length * dim * dim + b * length * dim * 3
    for result in (by_fvcore, by_torch):
        assert result["scan_calls"] == 2
        assert result["scan"] == scans
        assert result["macs"] == counted + scans


def test_scan_function_body_not_counted_twice():
    """A matmul inside a scan module's autograd Function is covered by scan_macs: fvcore sees an
    opaque PythonOp, and the torch counter skips it too; the functional projection stays counted."""
    b, length, dim, state = 1, 5, 4, 3
    net = FunctionScan(dim, state)
    x, c = torch.zeros(b, length, dim), torch.zeros(b, length, state)
    projection, scan = b * length * dim * dim * state, 9 * length * dim * state
    by_fvcore, by_torch = both(net, x, c)
    assert by_fvcore["macs"] == by_torch["macs"] == projection + scan
    # Without the skip, the torch counter would add the read-out (b L dim state) on top.
    with torch.enable_grad(), flops.FlopCounterMode(display=False) as plain:
        net(x, c)
    assert plain.get_total_flops() / 2 == projection + b * length * dim * state


@pytest.mark.skipif("mamba" not in list_backbones(), reason="mamba backbone not available")
def test_mamba_mixer_counters_agree_exactly():
    from backbones.mamba import MambaMixer

    mixer = MambaMixer(32, use_fused_kernels=False)
    x = torch.zeros(1, 16, 32)
    by_fvcore, by_torch = both(mixer, x)
    assert by_fvcore["scan"] == by_torch["scan"] == 9 * 16 * mixer.d_inner * mixer.d_state
    assert by_fvcore["macs"] == by_torch["macs"]


@pytest.mark.skipif("rwkv" not in list_backbones(), reason="rwkv backbone not available")
def test_bi_wkv_counts_its_formula_only():
    from backbones.rwkv import BiWKV

    wkv = BiWKV(16)
    k = torch.zeros(2, 12, 16)
    by_fvcore, by_torch = both(wkv, k, k)
    assert by_fvcore["macs"] == by_torch["macs"] == 29 * 2 * 12 * 16  # its cumsums/exps count nothing


# ---------------------------------------------------------------------------------------------
# tiny DiT: routed and unrouted against a per-block hand computation
# ---------------------------------------------------------------------------------------------

def dit_block_macs(n, with_norms):
    """adaLN (6D from the D-dim condition), qkv, QK^T + AV, proj, MLP 4x, and fvcore's 2 LayerNorms."""
    return 6 * D * D + n * D * 3 * D + 2 * n * n * D + n * D * D + 8 * n * D * D + (2 * 4 * n * D if with_norms else 0)


def tiny_dit_macs(tokens_per_block, with_norms):
    embed = N * (CH * PATCH * PATCH) * D + 256 * D + D * D  # patch conv, timestep MLP
    final = 2 * D * D + N * D * PATCH * PATCH * CH + (4 * N * D if with_norms else 0)
    return embed + sum(dit_block_macs(n, with_norms) for n in tokens_per_block) + final


ROUTE = [{"start": 1, "end": 3, "rate": 0.5}]


@pytest.fixture(scope="module")
def tiny_dit():
    torch.manual_seed(0)
    return RoutedNetwork(build_backbone("dit", "tiny", **DATA), ROUTE)


def test_tiny_dit_unrouted_and_routed_match_hand_count():
    with torch.device("meta"):  # counted on meta by the torch counter, on a CPU copy by fvcore
        net = RoutedNetwork(build_backbone("dit", "tiny", **DATA), ROUTE)
    full = flops.count_forward_macs(net, **DATA, routed=False)
    routed = flops.count_forward_macs(net, **DATA, routed=True)
    kept = N - N // 2
    for result, tokens in ((full, [N] * DEPTH), (routed, [N, kept, kept, kept, N, N])):
        assert result["tokens_per_block"] == tokens
        assert result["fvcore_macs"] == tiny_dit_macs(tokens, with_norms=True)  # fvcore counts LayerNorm
        assert result["torch_macs"] == tiny_dit_macs(tokens, with_norms=False)  # torch does not
        assert result["rel_diff"] < 0.01
    assert routed["fvcore_macs"] < full["fvcore_macs"]
    hand_ratio = tiny_dit_macs([N] * DEPTH, True) / tiny_dit_macs([N, kept, kept, kept, N, N], True)
    assert full["fvcore_macs"] / routed["fvcore_macs"] == pytest.approx(hand_ratio, rel=1e-12)


def test_forced_rate_in_eval_counts_routed_and_restores_mode(tiny_dit):
    tiny_dit.eval()
    forced = flops.count_forward_macs(tiny_dit, **DATA, force_rate=0.25)
    assert not tiny_dit.training and tiny_dit.fp32_after_route
    tokens = [N] + [N - N // 4] * 3 + [N, N]
    assert forced["tokens_per_block"] == tokens
    assert forced["torch_macs"] == tiny_dit_macs(tokens, with_norms=False)
    assert forced["fvcore_macs"] == tiny_dit_macs(tokens, with_norms=True)


def test_training_is_three_forwards_and_close_to_measured_backward(tiny_dit):
    forward = flops.count_forward_macs(tiny_dit, **DATA, routed=False)
    train = flops.training_macs(tiny_dit, **DATA, routed=False, measure=True, forward=forward)
    assert train["train_macs"] == 3 * forward["fvcore_macs"]
    # Measured: every product is repeated twice in backward, except the input gradients nobody
    # needs (the image into the patch conv, the sinusoidal features into the timestep MLP).
    unneeded = N * CH * PATCH * PATCH * D + 256 * D
    assert train["measured_macs"] == 3 * forward["torch_macs"] - unneeded
    assert all(p.grad is None for p in tiny_dit.parameters())


# ---------------------------------------------------------------------------------------------
# published DiT figures (DiT paper, Table 4), batch 1, counted on the meta device + a CPU copy
# ---------------------------------------------------------------------------------------------

def published_check(size, published, route_end, tread_estimate):
    row = flops.flops_table_row("dit", size, routes=[{"start": 2, "end": route_end, "rate": 0.5}])
    assert row["gflops_fwd"] == pytest.approx(published, rel=0.01)
    assert row["gflops_fwd_torch"] == pytest.approx(published, rel=0.01)
    assert row["counter_rel_diff"] < 0.01
    depth = {"S/2": 12, "B/2": 12, "L/2": 24, "XL/2": 28}[size]
    assert row["tokens_per_block"] == f"2x256,{route_end - 1}x128,{depth - route_end - 1}x256"
    assert row["gflops_fwd_routed"] == pytest.approx(tread_estimate, rel=0.01)


def test_dit_s2_matches_published():
    published_check("S/2", 6.06, 8, 4.20)


@pytest.mark.slow
@pytest.mark.parametrize("size,published,end,tread", [("B/2", 23.01, 8, 16.13), ("L/2", 80.71, 20, 48.18),
                                                      ("XL/2", 118.64, 24, 69.13)])
def test_larger_dits_match_published(size, published, end, tread):
    published_check(size, published, end, tread)


def test_a_sampling_pass_costs_the_torch_count_of_that_pass():
    """pass_macs (the guidance kind's cost of one sampling pass) is the torch counter's count of that forward,
    as count_forward_macs reports it beside fvcore's; a forced rate costs less than the unreduced pass."""
    from tread_bench.measure.flops import count_forward_macs, pass_macs
    from tread_bench.methods import build_network

    net = build_network("dit", "tiny", (1, 32, 32), 10, routes=[{"start": 1, "end": 3, "rate": 0.5}]).eval()
    full = pass_macs(net, (1, 32, 32), 10)
    forced = pass_macs(net, (1, 32, 32), 10, force_rate=0.5)
    assert full == count_forward_macs(net, 32, 1, 10, routed=False)["torch_macs"]
    assert forced == count_forward_macs(net, 32, 1, 10, force_rate=0.5, routed=True)["torch_macs"]
    assert forced < full


def test_sampling_macs_of_every_guidance_mode_match_hand_counts():
    """sampling_macs (MACs of one guided evaluation per image) per mode against the per-block hand count above:
    unguided = one full pass; CFG = two full passes (the batched cond/uncond pair); CFG with uncond_rate 1.0 on
    SPRINT (path-drop guidance) = a dense pass + a pass with the sparse blocks dropped (both with the fusion
    layer); Sparse Guidance (0.3, 0.7, 1.5) on TREAD = a pass at each forced rate, kept tokens counted by hand:
    64 - floor(64 * 0.3) = 45 and 64 - floor(64 * 0.7) = 20 in the routed blocks 1..3; equal rates = one pass."""
    from tread_bench.measure.evaluate import EvalConfig
    from tread_bench.methods import build_network

    shape = (CH, 32, 32)
    with torch.device("meta"):
        tread = RoutedNetwork(build_backbone("dit", "tiny", **DATA), ROUTE)
        sprint = build_network("dit", "tiny", shape, 10, kind="sprint")  # sparse blocks 2..3, fusion N x 2D -> D

    def mode(net, **ev):
        return flops.sampling_macs(net, shape, 10, EvalConfig(**ev), flops.pass_macs(net, shape, 10))

    dense = tiny_dit_macs([N] * DEPTH, with_norms=False)  # pass_macs is the torch counter's: no LayerNorms
    assert mode(tread) == dense
    assert mode(tread, cfg_scale=1.5) == 2 * dense
    strong, weak = tiny_dit_macs([N, 45, 45, 45, N, N], False), tiny_dit_macs([N, 20, 20, 20, N, N], False)
    assert mode(tread, sparse_guidance=[0.3, 0.7, 1.5]) == strong + weak
    assert strong + weak == flops.pass_macs(tread, shape, 10, 0.3) + flops.pass_macs(tread, shape, 10, 0.7)
    assert mode(tread, sparse_guidance=[0.5, 0.5, 2.0]) == tiny_dit_macs([N, 32, 32, 32, N, N], False)
    assert weak < strong < dense < strong + weak < 2 * dense  # here 1.49 unreduced passes, not 2

    fusion = N * 2 * D * D
    sprint_dense, sprint_dropped = dense + fusion, tiny_dit_macs([N] * 4, False) + fusion
    assert mode(sprint) == sprint_dense
    assert mode(sprint, cfg_scale=1.5) == 2 * sprint_dense
    assert mode(sprint, cfg_scale=1.5, uncond_rate=1.0) == sprint_dense + sprint_dropped
