"""Route semantics against a literal loop, hooks on a real DiT, and validation messages."""
import re

import pytest
import torch

from backbones import build_backbone
from tread_bench.core.errors import ConfigError
from routing import RoutedNetwork, Route, parse_routes, random_selection
from toy_backbones import AdditiveStack


def literal_routed_output(x, depth, routes, kept_masks):
    """Token n of sample b gets block k's constant 10**k unless a route containing k routed it."""
    b, _, h, w = x.shape
    out = x.clone().reshape(b, h * w)
    for s in range(b):
        for n in range(h * w):
            for k in range(depth):
                skipped = any(r.start <= k <= r.end and not m[s].reshape(-1)[n] for r, m in zip(routes, kept_masks))
                if not skipped:
                    out[s, n] += 10.0 ** k
    return out.reshape(b, 1, h, w)


def toy_inputs(batch=3, rows=4, cols=4):
    x = torch.randn(batch, 1, rows, cols, dtype=torch.float64) * 0.01
    return x, torch.zeros(batch), torch.zeros(batch, dtype=torch.long)


@pytest.mark.parametrize("selection", ["random", "rows"])
def test_two_routes_match_literal_loop(selection):
    stack = AdditiveStack(depth=8).double()
    routes = [Route(1, 2, 0.5), Route(4, 6, 0.25)]
    net = RoutedNetwork(stack, routes, selection=selection, seed=3).train()
    x, t, y = toy_inputs()
    out, masks = net(x, t, y, return_token_masks=True)
    assert len(masks) == 2
    expected = literal_routed_output(x, 8, routes, masks)
    assert torch.equal(out, expected)
    # each route kept exactly N - floor(N * rate) tokens in every sample
    assert masks[0].flatten(1).sum(1).tolist() == [8, 8, 8]
    assert masks[1].flatten(1).sum(1).tolist() == [12, 12, 12]


def test_rate_zero_is_exactly_unrouted():
    torch.manual_seed(0)
    bb = build_backbone("dit", "tiny", input_size=32, in_channels=1, num_classes=10)
    for p in bb.parameters():  # open the zero-initialised gates so every block matters
        p.data.normal_(0, 0.05)
    x, t, y = torch.randn(2, 1, 32, 32), torch.randn(2), torch.tensor([1, 2])
    net = RoutedNetwork(bb, [{"start": 1, "end": 4, "rate": 0.0}]).train()
    assert torch.equal(net(x, t, y), bb(x, t, y))
    # eval mode without force: no routing even with a non-zero rate
    net2 = RoutedNetwork(bb, [{"start": 1, "end": 4, "rate": 0.5}]).eval()
    assert torch.equal(net2(x, t, y), bb(x, t, y))
    assert not torch.equal(net2(x, t, y, force_rate=0.5), bb(x, t, y))


def test_routed_positions_hold_the_sequence_saved_before_the_route():
    torch.manual_seed(0)
    bb = build_backbone("dit", "tiny", input_size=32, in_channels=1, num_classes=10)
    for p in bb.parameters():
        p.data.normal_(0, 0.05)
    seen = {}
    bb.blocks[1].register_forward_hook(lambda m, a, out: seen.__setitem__("before", out.clone()))
    bb.blocks[2].register_forward_pre_hook(lambda m, args: seen.__setitem__("inside", args[0].shape))
    bb.blocks[5].register_forward_pre_hook(lambda m, args: seen.__setitem__("after", args[0].clone()))
    net = RoutedNetwork(bb, [{"start": 2, "end": 4, "rate": 0.5}], seed=1).train()
    _, (mask,) = net(torch.randn(3, 1, 32, 32), torch.randn(3), torch.tensor([0, 1, 2]), return_token_masks=True)
    kept = mask.flatten(1)
    assert seen["inside"] == (3, 32, 64)  # blocks 2..4 saw the kept half of 64 tokens
    assert torch.equal(seen["after"][~kept], seen["before"][~kept])  # routed: bit-identical skip
    assert not torch.allclose(seen["after"][kept], seen["before"][kept])  # kept: processed


def test_gradients_reach_routed_tokens_only_through_the_skip():
    stack = AdditiveStack(depth=5).double()
    net = RoutedNetwork(stack, [Route(1, 3, 0.5)], seed=0).train()
    x, t, y = toy_inputs(batch=2)
    x.requires_grad_(True)
    out, (mask,) = net(x, t, y, return_token_masks=True)
    routed = ~mask[:, None]
    out[routed].sum().backward()
    # the output at routed positions depends on its own input with slope 1 and on no other token ...
    assert torch.equal(x.grad[routed], torch.ones_like(x.grad[routed]))
    assert torch.equal(x.grad[~routed], torch.zeros_like(x.grad[~routed]))
    # ... and not at all on the parameters of the routed-over blocks 1..3
    for k in (1, 2, 3):
        assert stack.blocks[k].c.grad is None or stack.blocks[k].c.grad.item() == 0.0
    for k in (0, 4):
        assert stack.blocks[k].c.grad.item() == routed.sum().item()


def test_selection_is_per_sample_per_step_and_seeded():
    def masks(seed, steps=2):
        net = RoutedNetwork(AdditiveStack(depth=4, rows=8, cols=8), [Route(1, 2, 0.5)], seed=seed).train()
        x, t, y = toy_inputs(batch=4, rows=8, cols=8)
        return [net(x.float(), t, y, return_token_masks=True)[1][0] for _ in range(steps)]

    a1, a2 = masks(seed=7)
    b1, b2 = masks(seed=7)
    c1, _ = masks(seed=8)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # reproducible with the same seed
    assert not torch.equal(a1, a2)                       # redrawn every step
    assert not torch.equal(a1, c1)                       # other seed, other ids
    assert len({tuple(m.flatten().tolist()) for m in a1}) == 4  # samples differ from each other


def test_random_selection_ids_ascending_and_unique():
    ids = random_selection(5, 64, 24, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert ids.shape == (5, 24)
    assert torch.all(ids[:, 1:] > ids[:, :-1])


def test_row_selection_keeps_whole_rows_and_hands_blocks_the_smaller_grid():
    stack = AdditiveStack(depth=4, rows=8, cols=6, scan_mixing=True)
    net = RoutedNetwork(stack, [Route(1, 2, 0.5)], selection="auto", seed=0).train()
    assert net.selection == "rows"
    x, t, y = toy_inputs(batch=3, rows=8, cols=6)
    _, (mask,) = net(x.float(), t, y, return_token_masks=True)
    row_kept = mask.all(dim=2)
    assert torch.equal(row_kept, mask.any(dim=2))  # every row is all kept or all routed
    assert row_kept.sum(1).tolist() == [4, 4, 4]
    assert [c["grid"] for c in stack.blocks[1].calls] == [(4, 6)]
    assert [c["grid"] for c in stack.blocks[3].calls] == [(8, 6)]
    random_net = RoutedNetwork(AdditiveStack(depth=4), [Route(1, 2, 0.5)], selection="random").train()
    random_net(*toy_inputs())
    assert random_net.backbone.blocks[1].calls[0]["grid"] is None


@pytest.mark.parametrize("selection", ["random", "rows"])
def test_blocks_receive_the_full_grid_positions_of_the_tokens_they_hold(selection):
    stack = AdditiveStack(depth=6, rows=4, cols=6)
    net = RoutedNetwork(stack, [Route(1, 2, 0.5), Route(3, 4, 0.25)], selection=selection, seed=2).train()
    x, t, y = toy_inputs(batch=3, rows=4, cols=6)
    _, masks = net(x.float(), t, y, return_token_masks=True)
    full = torch.arange(24).expand(3, 24)
    for k in (0, 5):  # outside the routes: every token, in raster order
        assert torch.equal(stack.blocks[k].calls[0]["positions"], full)
    for blocks, mask in (((1, 2), masks[0]), ((3, 4), masks[1])):
        kept = mask.flatten(1)
        for k in blocks:  # inside a route: the kept tokens' own indices, per sample, ascending
            pos = stack.blocks[k].calls[0]["positions"]
            assert pos.dtype == torch.long and pos.shape == (3, int(kept[0].sum()))
            assert all(torch.equal(pos[b], kept[b].nonzero().squeeze(1)) for b in range(3))
    # the plain (unrouted) forward hands every block the full positions too
    stack(x.float(), t, y)
    assert all(torch.equal(block.calls[-1]["positions"], full) for block in stack.blocks)


def test_block_after_route_end_runs_in_fp32_without_autocast():
    stack = AdditiveStack(depth=5)
    net = RoutedNetwork(stack, [Route(1, 2, 0.5)]).train()
    x, t, y = toy_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x.float(), t, y)
    assert stack.blocks[3].calls[0]["autocast"] is False and stack.blocks[3].calls[0]["dtype"] == torch.float32
    assert stack.blocks[4].calls[0]["autocast"] is True


@pytest.mark.parametrize("routes, message", [
    ([{"start": 4, "end": 2, "rate": 0.5}], "end must be >= start"),
    ([{"start": 2, "end": 6, "rate": 0.5}], "beyond the last block 5"),
    ([{"start": 1, "end": 3, "rate": 0.5}, {"start": 3, "end": 4, "rate": 0.5}], "overlap"),
    ([{"start": 1, "end": 3, "rate": 1.0}], "must be in [0, 1)"),
    ([{"start": 1, "end": 3, "rate": -0.1}], "must be in [0, 1)"),
    ([{"start": 1, "end": 3}], "missing ['rate']"),
])
def test_invalid_routes_are_rejected(routes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RoutedNetwork(AdditiveStack(depth=6), routes)


def test_negative_end_counts_from_the_top():
    assert parse_routes([{"start": 2, "end": -4, "rate": 0.5}], depth=12) == [Route(2, 8, 0.5)]
    assert parse_routes([{"start": 2, "end": -4, "rate": 0.5}], depth=28) == [Route(2, 24, 0.5)]


def test_forcing_a_model_without_routes_is_a_clear_error():
    net = RoutedNetwork(AdditiveStack(depth=4), []).eval()
    with pytest.raises(ConfigError, match="no routes"):
        net(*toy_inputs(), force_rate=0.5)
