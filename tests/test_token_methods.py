"""MaskDiT (tread_bench/methods/maskdit.py) and drop-and-discard (tread_bench/methods/drop.py): token bookkeeping against literal loops,
the loss against a hand computation (EDM and flow), FLOPs against a hand count (decoder included), training
through the smoke suite, exact resume, process-count independence and one-line errors for bad input.
(Equivalence with the official MaskDiT code: benchmarks/compare_maskdit.py, which needs its checkout.)"""
import math

import pandas as pd
import pytest
import torch
import yaml

from tread_bench.core.errors import ConfigError
from tread_bench.data import load_dataset
from tread_bench.training.trainer import Trainer, TrainConfig
from tread_bench.measure import flops
from tread_bench.measure.flops import flops_table_row
from tread_bench.methods import build_network
from diffusion import build_objective
from suite_helpers import SUITES, run

SHAPE, CLASSES = (1, 32, 32), 10          # tiny backbones: 8x8 grid of 4x4 patches, width 64, 6 blocks
N, ROWS, PATCH, D, DEPTH = 64, 8, 4, 64, 6
DECODER = dict(decoder_depth=2, decoder_width=32, decoder_heads=4)
BACKBONES = ["dit", "rwkv", "mamba", "lightningdit"]
SCAN = {"rwkv", "mamba"}


def maskdit(backbone="dit", **kw):
    return build_network(backbone, "tiny", SHAPE, CLASSES, "maskdit", **{**DECODER, **kw})


def drop(backbone="dit", **kw):
    return build_network(backbone, "tiny", SHAPE, CLASSES, "drop", **kw)


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *SHAPE, generator=g), torch.rand(batch, generator=g),
            torch.randint(0, CLASSES, (batch,), generator=g))


def randomise(net):
    """Open the zero-initialised gates and layers, so every part of the network changes the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name or "decoder_in" in name or "decoder_out" in name:
                p.normal_(std=0.1)
    return net


def literal_kept_ids(seed, batch, rate, rows_selection, world=1, rank=0):
    """The kept ids each sample should get, drawn here from a fresh generator the way the method's own draw is
    documented (uniform noise per token, or per row; the lowest-noise ones are kept), sorted, in plain lists."""
    g = torch.Generator().manual_seed(seed)
    if rows_selection:
        noise = torch.rand(batch * world, ROWS, generator=g)
        kept_rows = ROWS - int(ROWS * rate)
        out = []
        for sample in noise.tolist()[rank * batch:(rank + 1) * batch]:
            rows = sorted(sorted(range(ROWS), key=lambda r: sample[r])[:kept_rows])
            out.append([r * ROWS + c for r in rows for c in range(ROWS)])
        return out
    noise = torch.rand(batch * world, N, generator=g)
    keep = N - int(N * rate)
    return [sorted(sorted(range(N), key=lambda j: sample[j])[:keep])
            for sample in noise.tolist()[rank * batch:(rank + 1) * batch]]


class Recorder:
    """Records every call's inputs (and output) of the given modules."""

    def __init__(self, **modules):
        self.calls, self.handles = {k: [] for k in modules}, []
        for key, module in modules.items():
            self.handles.append(module.register_forward_hook(
                lambda m, args, out, key=key: self.calls[key].append((args, out))))

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------------------
# token bookkeeping against literal loops
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", BACKBONES)
def test_maskdit_blocks_see_the_kept_tokens_and_the_decoder_gets_them_back_at_their_positions(backbone):
    net = randomise(maskdit(backbone, seed=5)).train()
    x, t, y = inputs()
    bb = net.backbone
    truth = literal_kept_ids(5, 2, 0.5, backbone in SCAN)
    blocks = {f"block{i}": b for i, b in enumerate(bb.blocks)}
    with torch.no_grad(), Recorder(**blocks, dec_in=net.decoder_in, dec0=net.decoder_blocks[0]) as calls:
        net(x, t, y)
        embedded, _ = bb.embed(x, t, y)
    kept_grid = (ROWS // 2, ROWS) if backbone in SCAN else None
    for i in range(DEPTH):
        (tokens, _, grid, positions), _ = calls[f"block{i}"][0]
        assert positions.tolist() == truth and grid == kept_grid  # true positions (LightningDiT's RoPE uses them)
        assert tokens.shape[1] == len(truth[0]) == net.tokens_per_block()[i]
    first = calls["block0"][0][0][0]
    last_out = calls[f"block{DEPTH - 1}"][0][1]
    dec_in_out = calls["dec_in"][0][1]
    assert torch.equal(calls["dec_in"][0][0][0], last_out)  # the decoder starts from the last block's output
    decoder_input = calls["dec0"][0][0][0]
    pos = net.decoder_pos_embed[0]
    for b in range(2):
        for slot, j in enumerate(truth[b]):
            assert torch.equal(first[b, slot], embedded[b, j])  # block 0 gets the embedded kept tokens
        for j in range(N):  # back at their positions; the learned mask token at the dropped ones
            value = dec_in_out[b, truth[b].index(j)] if j in truth[b] else net.mask_token[0, 0]
            torch.testing.assert_close(decoder_input[b, j], value + pos[j], rtol=0, atol=1e-6)

    net.eval()  # evaluation is unmasked, decoder still applied: every block sees every token, no mask token
    with torch.no_grad(), Recorder(block0=bb.blocks[0], dec_in=net.decoder_in, dec0=net.decoder_blocks[0]) as calls:
        net(x, t, y)
    (tokens, _, grid, positions), _ = calls["block0"][0]
    assert tokens.shape[1] == N and grid == bb.grid_size and positions.tolist() == [list(range(N))] * 2
    torch.testing.assert_close(calls["dec0"][0][0][0], calls["dec_in"][0][1] + net.decoder_pos_embed)
    assert net.tokens_per_block(force_rate=0) == [N] * DEPTH


@pytest.mark.parametrize("backbone", BACKBONES)
def test_drop_discards_tokens_from_its_start_block_and_never_reinserts_them(backbone):
    net = randomise(drop(backbone, start=2, seed=4)).train()
    x, t, y = inputs()
    bb = net.backbone
    truth = literal_kept_ids(4, 2, 0.5, backbone in SCAN)
    blocks = {f"block{i}": b for i, b in enumerate(bb.blocks)}
    with torch.no_grad(), Recorder(**blocks, head=bb.final_layer) as calls:
        out = net(x, t, y)
    for i in range(DEPTH):
        (tokens, _, grid, positions), _ = calls[f"block{i}"][0]
        dense = i < 2
        assert positions.tolist() == ([list(range(N))] * 2 if dense else truth)
        assert grid == (bb.grid_size if dense else ((ROWS // 2, ROWS) if backbone in SCAN else None))
        assert tokens.shape[1] == net.tokens_per_block()[i] == (N if dense else len(truth[0]))
    before, after = calls["block1"][0][1], calls["block2"][0][0][0]
    last = calls[f"block{DEPTH - 1}"][0][1]
    head_in = calls["head"][0][0][0]
    for b in range(2):
        for slot, j in enumerate(truth[b]):
            assert torch.equal(after[b, slot], before[b, j])  # block 2 gets block 1's outputs at the kept ids
        for j in range(N):
            r, c = divmod(j, ROWS)
            patch = out[b, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
            if j in truth[b]:
                assert torch.equal(head_in[b, j], last[b, truth[b].index(j)])
                assert patch.abs().sum() > 0
            else:  # discarded: nothing reaches the head there, and there is no output
                assert not head_in[b, j].any() and not patch.any()
    assert net.describe() == "drop(2->5)@0.5"


def test_draws_depend_on_the_global_batch_only_and_the_rng_state_replays_them():
    for make in (maskdit, drop):
        whole, half = randomise(make(seed=3)).train(), make(seed=3).train()
        half.load_state_dict(whole.state_dict())
        half.set_shard(1, 2)
        x, t, y = inputs(4)
        with torch.no_grad(), Recorder(b=whole.backbone.blocks[-1]) as w, Recorder(b=half.backbone.blocks[-1]) as h:
            whole(x, t, y)
            half(x[2:], t[2:], y[2:])
        assert w["b"][0][0][3][2:].tolist() == h["b"][0][0][3].tolist() == literal_kept_ids(3, 2, 0.5, False, 2, 1)
        state = whole.rng_state()
        with torch.no_grad():
            first, second = whole(x, t, y), whole(x, t, y)
            whole.set_rng_state(state)
            again = whole(x, t, y)
        assert not torch.equal(first, second) and torch.equal(first, again)


# ------------------------------------------------------------------------------------------------------
# the loss against a hand computation
# ------------------------------------------------------------------------------------------------------

def hand_loss(pred, err, noisy, kept_ids, mae_weight):
    """Literal loops in float64: the main error averaged over each kept token's pixels and channels, then over
    kept tokens; plus mae_weight x, over dropped tokens, the mean over the patch of (prediction - the noisy
    input's patch normalised by its mean and unbiased variance)^2."""
    pred, err, noisy = pred.double(), err.double(), noisy.double()
    out = []
    for b in range(pred.shape[0]):
        main, mae, dropped = 0.0, 0.0, 0
        for j in range(N):
            r, c = divmod(j, ROWS)
            window = (b, slice(None), slice(r * PATCH, (r + 1) * PATCH), slice(c * PATCH, (c + 1) * PATCH))
            if j in kept_ids[b]:
                main += err[window].mean().item()
                continue
            values, target = pred[window].flatten().tolist(), noisy[window].flatten().tolist()
            mean = sum(target) / len(target)
            var = sum((v - mean) ** 2 for v in target) / (len(target) - 1)
            mae += sum((p - (v - mean) / math.sqrt(var + 1e-6)) ** 2 for p, v in zip(values, target)) / len(values)
            dropped += 1
        total = main / len(kept_ids[b])
        if mae_weight and dropped:
            total += mae_weight * mae / dropped
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("objective", ["edm", "flow"])
@pytest.mark.parametrize("kind", ["maskdit", "drop"])
def test_training_loss_matches_a_hand_computation(kind, objective):
    net = randomise(maskdit(seed=2) if kind == "maskdit" else drop(seed=2)).train()
    obj = build_objective(objective)
    model = obj.wrap(net)
    x, _, y = inputs(2, seed=7)
    draws = obj.draw(2, SHAPE, torch.Generator().manual_seed(8))
    state = net.rng_state()
    with torch.no_grad(), Recorder(b=net.backbone.blocks[0]) as calls:
        loss = obj.loss(model, x, y, draws)
    kept = calls["b"][0][0][3].tolist()
    net.set_rng_state(state)  # the same draw again, to read the prediction the loss saw
    with torch.no_grad():
        if objective == "edm":
            sigma = draws["sigma"].reshape(-1, 1, 1, 1)
            noisy = x + draws["noise"] * sigma
            pred = model(noisy, sigma.flatten(), y)
            err = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2 * (pred - x) ** 2
        else:
            t4 = draws["t"].reshape(-1, 1, 1, 1)
            noisy = (1 - t4) * x + t4 * draws["noise"]
            pred = model(noisy, t4.flatten(), y)
            err = (pred - (draws["noise"] - x)) ** 2
    expected = hand_loss(pred, err, noisy, kept, 0.1 if kind == "maskdit" else 0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    if kind == "maskdit":  # the MAE term is there and is not small: without it the loss differs
        assert (expected - hand_loss(pred, err, noisy, kept, 0)).min() > 1e-3
    net.eval()  # evaluation: nothing dropped, the plain loss over every pixel
    with torch.no_grad():
        plain = obj.loss(model, x, y, draws)
        full = model(noisy, (draws["sigma"] if objective == "edm" else draws["t"]), y)
        target = x if objective == "edm" else draws["noise"] - x
        weight = ((sigma ** 2 + 0.25) / (sigma * 0.5) ** 2) if objective == "edm" else 1
        torch.testing.assert_close(plain, (weight * (full - target) ** 2).mean(dim=(1, 2, 3)))


def test_the_loss_ignores_the_dropped_tokens_of_drop_but_not_of_maskdit():
    for make, changes in ((drop, False), (maskdit, True)):
        net = randomise(make(seed=1)).train()
        obj = build_objective("edm")
        x, _, y = inputs(2, seed=3)
        draws = obj.draw(2, SHAPE, torch.Generator().manual_seed(4))
        state = net.rng_state()
        with torch.no_grad(), Recorder(b=net.backbone.blocks[0]) as calls:
            base = obj.loss(obj.wrap(net), x, y, draws)
        kept = calls["b"][0][0][3]
        dropped = [j for j in range(N) if j not in kept[0].tolist()][0]
        r, c = divmod(dropped, ROWS)
        x2 = x.clone()
        x2[0, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] += 3.0  # a dropped token's clean pixels
        net.set_rng_state(state)
        with torch.no_grad():
            other = obj.loss(obj.wrap(net), x2, y, draws)
        # drop: nothing at a dropped token reaches the loss; maskdit: its MAE term reads the noisy input there
        assert (not torch.equal(base[0], other[0])) == changes and torch.equal(base[1], other[1])


def test_every_trained_parameter_gets_a_gradient_masked_and_unmasked_and_the_unused_head_is_no_parameter():
    for mask_ratio in (0.5, 0.0):  # 0: the unmasked fine-tune stage; data-parallel training needs every grad
        net = maskdit(mask_ratio=mask_ratio).train()
        obj = build_objective("edm")
        x, _, y = inputs(2)
        obj.loss(obj.wrap(net), x, y, obj.draw(2, SHAPE, torch.Generator().manual_seed(0))).mean().backward()
        missing = [name for name, p in net.named_parameters() if p.grad is None]
        assert not missing, missing
    names = {name for name, _ in net.named_parameters()}
    assert not any(n.startswith("backbone.final_layer") for n in names)  # the decoder's output layer replaces it
    assert "backbone.final_layer.linear.weight" in net.state_dict()  # a buffer: checkpoints keep every key
    base = build_network("dit", "tiny", SHAPE, CLASSES, routes=[])
    head = sum(p.numel() for n, p in base.named_parameters() if n.startswith("backbone.final_layer"))
    decoder = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("backbone."))
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in base.parameters()) - head + decoder


# ------------------------------------------------------------------------------------------------------
# FLOPs against a hand count (decoder included)
# ------------------------------------------------------------------------------------------------------

def dit_block(n, width, cond, norms):
    """adaLN (6 width from cond), qkv, QK^T + AV, proj, MLP 4x; fvcore adds 4 per element of its 2 LayerNorms."""
    return 6 * cond * width + 12 * n * width * width + 2 * n * n * width + (8 * n * width if norms else 0)


def modulated_linear(n, width, out, cond, norms):
    return 2 * cond * width + n * width * out + (4 * n * width if norms else 0)


def tiny_macs(kind, kept, norms):
    embed = N * PATCH * PATCH * D + 256 * D + D * D  # patch conv, timestep MLP (label lookup: 0)
    if kind == "maskdit":  # blocks on the kept tokens; decoder in on them; 2 decoder blocks (width 32) on all
        d = DECODER["decoder_width"]
        decoder = DECODER["decoder_depth"] * dit_block(N, d, D, norms) + modulated_linear(N, d, PATCH * PATCH, D, norms)
        return embed + DEPTH * dit_block(kept, D, D, norms) + modulated_linear(kept, D, d, D, norms) + decoder
    blocks = dit_block(N, D, D, norms) + (DEPTH - 1) * dit_block(kept, D, D, norms)  # start: 1
    return embed + blocks + modulated_linear(N, D, PATCH * PATCH, D, norms)  # the head runs on the full sequence


@pytest.mark.parametrize("kind", ["maskdit", "drop"])
def test_flops_match_a_hand_count_with_the_decoder(kind):
    data = dict(input_size=32, in_channels=1, num_classes=CLASSES)
    with torch.device("meta"):
        net = maskdit() if kind == "maskdit" else drop(start=1)
    full = flops.count_forward_macs(net, **data, routed=False)
    reduced = flops.count_forward_macs(net, **data, routed=True)
    for result, kept in ((full, N), (reduced, N // 2)):
        assert result["torch_macs"] == tiny_macs(kind, kept, norms=False)
        assert result["fvcore_macs"] == tiny_macs(kind, kept, norms=True)
    row = flops_table_row("dit", "tiny", kind=kind, **data, **(DECODER if kind == "maskdit" else {"start": 1}))
    assert row["tokens_per_block"] == ("6x32" if kind == "maskdit" else "1x64,5x32")
    assert row["gflops_train"] == pytest.approx(3 * tiny_macs(kind, N // 2, True) / 1e9)
    assert row["params"] == sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------------------------------------------
# the suite: YAML entries, training, resume
# ------------------------------------------------------------------------------------------------------

def test_the_yaml_entries_build_on_every_backbone():
    entries = yaml.safe_load(open(f"{SUITES}/suite/common/methods.yaml"))["methods"]
    assert set(entries) == {"maskdit", "drop"}
    for name, entry in entries.items():
        args = {k: v for k, v in entry.items() if k != "kind"}
        for backbone in BACKBONES:
            with torch.device("meta"):
                net = build_network(backbone, "tiny", SHAPE, CLASSES, entry["kind"], **args)
            assert net.selection == ("rows" if backbone in SCAN else "random")
            assert net.tokens_per_block() == [(N // 2)] * DEPTH


def test_both_methods_train_through_the_smoke_suite(tmp_path):
    assert run(["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs",
                "suite.train.steps=4", "suite.data.limit=64", "~suite.methods.tread", "+suite/common=methods",
                "suite.methods.maskdit.decoder_depth=1", "suite.methods.maskdit.decoder_width=32",
                "suite.methods.maskdit.decoder_heads=4"]) == 0
    table = pd.read_csv(tmp_path / "r" / "smoke.csv").set_index("method")
    assert sorted(table.index) == ["baseline", "drop", "maskdit"] and set(table.status) == {"ok"}
    assert table.loc["maskdit", "setting"] == "maskdit@0.5, decoder 1x32, mae 0.1"
    assert table.loc["drop", "setting"] == "drop(0->5)@0.5" and table.loc["drop", "selection"] == "random"
    assert table.loc["drop", "params"] == table.loc["baseline", "params"] < table.loc["maskdit", "params"]
    speed = pd.read_csv(tmp_path / "r" / "smoke_speedup.csv").set_index("method")
    assert speed.loc["drop", "flop_ratio"] > 1 and speed.loc["maskdit", "flop_ratio"] > 1


@pytest.mark.parametrize("kind", ["maskdit", "drop"])
def test_resume_is_exact(kind, tmp_path):
    def trainer(run_dir, steps):
        data = load_dataset("synthetic", 32, limit=32)
        torch.manual_seed(0)
        args = dict(DECODER, mask_ratio=0.5) if kind == "maskdit" else dict(rate=0.5)
        net = build_network("dit", "tiny", data.shape, data.num_classes, kind, seed=3, **args)
        return Trainer(build_objective("edm").wrap(net), data,
                       TrainConfig(steps=steps, global_batch=4, log_every=1, lr=1e-3), run_dir)

    whole = trainer(tmp_path / "whole", 6)
    whole.train()
    trainer(tmp_path / "half", 3).train()
    resumed = trainer(tmp_path / "half", 6)
    torch.manual_seed(123)
    resumed.raw.net.generator.manual_seed(99)  # the token draws must come from the checkpoint
    assert resumed.try_resume()
    resumed.train()
    assert [s["loss"] for s in resumed.stats] == [s["loss"] for s in whole.stats]


# ------------------------------------------------------------------------------------------------------
# bad input: one line that says what to change
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, args, message", [
    ("maskdit", {"mask_ratio": 1.0}, r"maskdit: mask_ratio = 1.0 must be a number in \[0, 1\)"),
    ("maskdit", {"mask_ratio": "half"}, r"maskdit: mask_ratio = 'half' must be a number"),
    ("maskdit", {"mask_ratio": True}, r"maskdit: mask_ratio = True must be a number"),
    ("maskdit", {"decoder_depth": 0}, r"maskdit: decoder_depth = 0 must be a whole number >= 1"),
    ("maskdit", {"decoder_width": 30, "decoder_heads": 4}, r"decoder_width 30 must be a multiple of 4 .* and of"),
    ("maskdit", {"decoder_width": 32, "decoder_heads": 3}, r"decoder_width 32 must be a multiple .* decoder_heads 3"),
    ("maskdit", {"decoder_width": "x/2"}, r"maskdit: decoder_width = 'x/2' must be a whole number or a positive "
                                          r"fraction of the backbone's like '1/3'"),
    ("maskdit", {"decoder_depth": "-1/3"}, r"maskdit: decoder_depth = '-1/3' must be a whole number or a positive"),
    ("maskdit", {"decoder_width": 40, "decoder_heads": "auto"}, r"decoder_heads auto needs a decoder width that is "
                                                                r"a multiple of 32, got 40"),
    ("maskdit", {"mae_weight": -0.1}, r"maskdit: mae_weight = -0.1 must be a number >= 0"),
    ("maskdit", {"selection": "diag"}, r"maskdit: unknown selection 'diag'; choose one of random, rows or auto"),
    ("maskdit", {"mask_ratios": 0.5}, r"method kind 'maskdit' rejected its arguments .*mask_ratios"),
    ("drop", {"rate": -0.5}, r"drop: rate = -0.5 must be a number in \[0, 1\)"),
    ("drop", {"start": 6}, r"drop: start = 6 must be a block index in \[0, 5\]"),
    ("drop", {"ratio": 0.5}, r"method kind 'drop' rejected its arguments .*ratio"),
])
def test_bad_input_is_one_line_saying_what_to_change(kind, args, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_network("dit", "tiny", SHAPE, CLASSES, kind, **args)
    assert "\n" not in str(err.value)


def test_impossible_forced_rates_and_the_route_aware_loss_are_refused():
    x, t, y = inputs()
    for net in (maskdit(), drop()):
        with pytest.raises(ConfigError, match=r"force_rate = 1.0 must be a number in \[0, 1\)"):
            net(x, t, y, force_rate=1.0)
        with pytest.raises(ConfigError, match="route-aware loss .* set suite.train.route_aware_loss: false"):
            build_objective("edm").loss(build_objective("edm").wrap(net.train()), x, y,
                                        build_objective("edm").draw(2, SHAPE, torch.Generator()), route_aware=True)
