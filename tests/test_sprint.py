"""SPRINT (tread_bench/methods/sprint.py) against independent truth: a literal per-sample, per-token loop for the token
bookkeeping, hand counts for the grouping and the FLOPs, a hand-written combination of two forward calls for
path-drop guidance, the suite for training, resume and bad input."""
import pandas as pd
import pytest
import torch
from torch import nn

from tread_bench.core.errors import ConfigError
from diffusion.sampler import SamplerConfig, guided_denoise
from tread_bench.training.trainer import Trainer, TrainConfig
from tread_bench.data import load_dataset
from tread_bench.measure.flops import count_forward_macs, flops_table_row
from tread_bench.methods import build_network
from tread_bench.methods.sprint import structured_groups, structured_selection, subgrid_selection
from diffusion import build_objective
from suite_helpers import rng_state_replays, run

SHAPE, CLASSES = (1, 32, 32), 10  # tiny backbones: 8x8 tokens of width 64, 6 blocks


def sprint(backbone="dit", **args):
    torch.manual_seed(0)
    return build_network(backbone, "tiny", SHAPE, CLASSES, kind="sprint", **args)


def randomize(net: nn.Module, seed: int = 1) -> nn.Module:
    """Non-zero weights everywhere (adaLN-Zero and the zero head would make every output 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def inputs(batch, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *SHAPE, generator=g), torch.rand(batch, generator=g),
            torch.randint(0, CLASSES, (batch,), generator=g))


class BlockCalls:
    """Records what each backbone block received: token count, grid and positions."""

    def __init__(self, net):
        self.calls = {}
        self.handles = [b.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(net.backbone.blocks)]

    def _hook(self, i):
        def record(module, args):
            tokens, _, grid, positions = args
            self.calls[i] = (tokens.shape[1], grid, positions.clone())
        return record

    def remove(self):
        for h in self.handles:
            h.remove()


def literal_ids(net, generator, batch):
    """Kept ids by the official scheme written out per sample and group, from the same generator draws."""
    rows, cols = net.backbone.grid_size
    if net.selection == "structured":
        g, keep = structured_groups(net.drop_ratio, (rows, cols))
        noise = torch.rand(batch, rows // g, cols // g, g * g, generator=generator)
        ids = []
        for b in range(batch):
            kept = []
            for gr in range(rows // g):
                for gc in range(cols // g):
                    best = sorted(range(g * g), key=lambda j: -noise[b, gr, gc, j].item())[:keep]
                    kept += [(gr * g + j // g) * cols + gc * g + j % g for j in best]
            ids.append(sorted(kept))
        return ids, None
    assert net.selection == "subgrid"
    g = 2  # drop ratio 0.75: one token of every 2x2 group
    noise = torch.rand(batch, g * g, generator=generator)
    ids = []
    for b in range(batch):
        offset = max(range(g * g), key=lambda j: noise[b, j].item())
        ids.append([(r + offset // g) * cols + c + offset % g for r in range(0, rows, g) for c in range(0, cols, g)])
    return ids, (rows // g, cols // g)


@pytest.mark.parametrize("backbone", ["dit", "lightningdit", "rwkv", "mamba"])
def test_token_bookkeeping_matches_a_literal_loop(backbone):
    net = randomize(sprint(backbone, path_drop_prob=0.5, seed=3)).train()
    batch = 6
    x, t, y = inputs(batch)
    replay = torch.Generator()
    replay.set_state(net.rng_state())
    fused_inputs = []
    hook = net.fusion.register_forward_pre_hook(lambda m, a: fused_inputs.append(a[0].clone()))
    calls = BlockCalls(net)
    with torch.no_grad():
        out, (mask,) = net(x, t, y, return_token_masks=True)
    calls.remove(), hook.remove()

    ids, kept_grid = literal_ids(net, replay, batch)
    dropped = torch.rand(batch, generator=replay) < 0.5
    assert 0 < dropped.sum() < batch  # both kinds of sample are in the batch
    bb, n = net.backbone, net.backbone.num_tokens
    full = torch.arange(n).expand(batch, n)
    with torch.no_grad():
        tokens, cond = bb.embed(x, t, y)
        for i in (0, 1):
            tokens = bb.blocks[i](tokens, cond, bb.grid_size, full)
        shallow = tokens
        kept = torch.stack([tokens[b, ids[b]] for b in range(batch)])
        for i in (2, 3):
            kept = bb.blocks[i](kept, cond, kept_grid, torch.tensor(ids))
        sparse = torch.empty_like(tokens)
        for b in range(batch):
            for p in range(n):  # each kept token returns to its own position; the others get the mask token
                sparse[b, p] = net.mask_token[0, 0] if dropped[b] or p not in ids[b] else kept[b, ids[b].index(p)]
        tokens = net.fusion(torch.cat([sparse, shallow], dim=-1))
        for i in (4, 5):
            tokens = bb.blocks[i](tokens, cond, bb.grid_size, full)
        expected = bb.head(tokens, cond)

    for i in (0, 1, 4, 5):  # dense blocks: every token, full grid, raster positions
        assert calls.calls[i][0] == n and calls.calls[i][1] == bb.grid_size and torch.equal(calls.calls[i][2], full)
    for i in (2, 3):  # sparse blocks: the kept tokens at their true positions (RoPE uses them)
        count, grid, positions = calls.calls[i]
        assert count == n // 4 and grid == kept_grid and positions.tolist() == ids
    assert torch.allclose(fused_inputs[0], torch.cat([sparse, shallow], dim=-1), atol=1e-6)
    assert torch.allclose(out, expected, atol=1e-5)
    assert mask.view(batch, -1).nonzero()[:, 1].view(batch, -1).tolist() == ids
    assert net.tokens_per_block() == [n, n, n // 4, n // 4, n, n]


def test_eval_is_dense_and_force_rate_one_skips_the_sparse_path():
    net = randomize(sprint()).eval()
    x, t, y = inputs(2)
    state = net.rng_state()
    calls = BlockCalls(net)
    with torch.no_grad():
        dense = net(x, t, y)
        assert all(calls.calls[i][0] == 64 for i in range(6))  # SPRINT's dense inference
        calls.calls.clear()
        dropped = net(x, t, y, force_rate=1.0)
    calls.remove()
    assert sorted(calls.calls) == [0, 1, 4, 5]  # the middle blocks are not run at all
    assert torch.equal(net.rng_state(), state)  # and nothing was drawn
    assert not torch.allclose(dense, dropped)
    assert net.tokens_per_block(force_rate=1.0) == [64, 64, 0, 0, 64, 64]


def test_structured_grouping_keeps_k_of_every_group_uniformly():
    # the official table (src/utils/utils.py prepare_mask_and_input): ratio -> (group size, kept per group)
    for rate, (g, k) in {0.75: (2, 1), 0.5: (2, 2), 0.625: (4, 6), 0.875: (4, 2)}.items():
        assert structured_groups(rate, (8, 8)) == (g, k)
        ids = structured_selection(500, (8, 8), g, k, torch.Generator().manual_seed(0), "cpu")
        assert ids.shape == (500, 64 // (g * g) * k)
        assert (ids.diff(dim=1) > 0).all()  # ascending, no repeats
        group_of = (ids // 8 // g) * (8 // g) + (ids % 8) // g
        per_group = torch.zeros(500, (8 // g) ** 2, dtype=torch.long).scatter_add_(1, group_of, torch.ones_like(ids))
        assert (per_group == k).all()  # exactly k from every group of every sample
        offset = (ids // 8 % g) * g + ids % 8 % g
        share = torch.bincount(offset.flatten(), minlength=g * g).float() / offset.numel()
        assert torch.allclose(share, torch.full((g * g,), 1 / (g * g)), atol=0.01)  # each offset equally likely


def test_subgrid_grouping_keeps_a_strided_grid():
    ids, grid = subgrid_selection(400, (8, 8), 2, torch.Generator().manual_seed(0), "cpu")
    assert grid == (4, 4) and ids.shape == (400, 16)
    rows, cols = ids // 8, ids % 8
    assert (rows.view(400, 4, 4).diff(dim=1) == 2).all() and (cols.view(400, 4, 4).diff(dim=2) == 2).all()
    assert (rows % 2 == rows[:, :1] % 2).all() and (cols % 2 == cols[:, :1] % 2).all()  # one offset per sample
    share = torch.bincount((rows[:, 0] % 2) * 2 + cols[:, 0] % 2, minlength=4).float() / 400
    assert torch.allclose(share, torch.full((4,), 0.25), atol=0.06)
    # scan backbones: sub-grid when the ratio is 1 - 1/g^2, else whole rows (a grid either way)
    assert sprint("mamba").selection == "subgrid" and sprint("rwkv", drop_ratio=0.5).selection == "rows"
    assert sprint("rwkv", drop_ratio=0.5).tokens_per_block() == [64, 64, 32, 32, 64, 64]


def test_flops_match_a_hand_count_with_the_fusion_layer():
    d, n, n_kept, patch = 64, 64, 16, 16  # width, tokens, tokens kept at 0.75, pixels per patch

    def block(k):  # qkv + proj + MLP (12 k d^2), Q K^T and A V (2 k^2 d), adaLN (6 d^2)
        return 12 * k * d * d + 2 * k * k * d + 6 * d * d

    io = n * d * patch + 256 * d + d * d + 2 * d * d + n * d * patch  # patch embed, t-MLP, final adaLN + linear
    fusion = n * 2 * d * d
    with torch.device("meta"):
        net = build_network("dit", "tiny", SHAPE, CLASSES, kind="sprint")
    dense = count_forward_macs(net, 32, 1, CLASSES, routed=False)
    train = count_forward_macs(net, 32, 1, CLASSES, routed=True)
    pdg = count_forward_macs(net, 32, 1, CLASSES, force_rate=1.0)
    assert dense["torch_macs"] == io + fusion + 6 * block(n)
    assert train["torch_macs"] == io + fusion + 4 * block(n) + 2 * block(n_kept)
    assert pdg["torch_macs"] == io + fusion + 4 * block(n)
    layernorm = 4 * d  # fvcore: 4 MACs per LayerNorm element (two per block per token, one in the head)
    assert train["fvcore_macs"] == train["torch_macs"] + layernorm * (2 * (4 * n + 2 * n_kept) + n)
    row = flops_table_row("dit", "tiny", kind="sprint", input_size=32, in_channels=1, num_classes=CLASSES)
    baseline = flops_table_row("dit", "tiny", routes=[], input_size=32, in_channels=1, num_classes=CLASSES)
    assert row["tokens_per_block"] == "2x64,2x16,2x64" and row["selection"] == "structured"
    assert row["gflops_fwd_routed"] * 1e9 == train["fvcore_macs"]
    assert row["params"] - baseline["params"] == 2 * d * d + d + d  # fusion weight and bias, mask token


def test_path_drop_guidance_is_cfg_with_the_sparse_path_dropped_in_the_unconditional_branch():
    net = randomize(sprint()).eval()
    den = build_objective("flow").wrap(net)
    x, t, y = inputs(3)
    scale = 2.5
    with torch.no_grad():
        out = guided_denoise(den, x, t[0], y, SamplerConfig(cfg_scale=scale, uncond_rate=1.0), CLASSES)
        tt = t[0].expand(3)
        cond = net(x, tt, y)  # dense, conditional
        bb = net.backbone  # the official forward_pdg's null-label half, written out
        tokens, c = bb.embed(x, tt, torch.full_like(y, CLASSES))
        full = torch.arange(64).expand(3, 64)
        for i in (0, 1):
            tokens = bb.blocks[i](tokens, c, bb.grid_size, full)
        tokens = net.fusion(torch.cat([net.mask_token.expand_as(tokens), tokens], dim=-1))
        for i in (4, 5):
            tokens = bb.blocks[i](tokens, c, bb.grid_size, full)
        weak = bb.head(tokens, c)
        expected = weak.double() + scale * (cond.double() - weak.double())
        assert torch.allclose(out, expected, atol=1e-6)
        # Sparse Guidance at (0, 1) is not PDG: its weak branch keeps the class label
        rate = guided_denoise(den, x, t[0], y, SamplerConfig(sparse_guidance=(0.0, 1.0, scale)), CLASSES)
        assert not torch.allclose(rate, expected, atol=1e-3)


def test_uncond_rate_reaches_only_the_unconditional_call():
    seen = []

    def denoiser(x, sigma, labels, force_rate=None):
        seen.append((labels.tolist(), force_rate))
        return x * 0 + (labels[:, None, None, None].float() + (force_rate or 0))

    x, labels = torch.zeros(2, 1, 2, 2), torch.tensor([1, 2])
    out = guided_denoise(denoiser, x, torch.tensor(1.0), labels, SamplerConfig(cfg_scale=3.0, uncond_rate=1.0), 9)
    assert seen == [([1, 2], None), ([9, 9], 1.0)]
    assert torch.equal(out[:, 0, 0, 0], torch.tensor([10 + 3 * (1 - 10), 10 + 3 * (2 - 10)], dtype=torch.float64))


def test_sprint_trains_through_the_smoke_suite(tmp_path):
    assert run(["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs",
                "suite.train.steps=4", "suite.data.limit=64", "~suite.methods.tread",
                "+suite.methods.sprint={kind:sprint}"]) == 0
    table = pd.read_csv(tmp_path / "r" / "smoke.csv").set_index("method")
    assert list(table.index) == ["baseline", "sprint"] and set(table.status) == {"ok"}
    assert table.loc["sprint", "setting"] == "sprint(2->3)@0.75, path drop 0.1"
    assert table.loc["sprint", "selection"] == "structured"
    assert table.loc["sprint", "params"] - table.loc["baseline", "params"] == 2 * 64 * 64 + 2 * 64
    speed = pd.read_csv(tmp_path / "r" / "smoke_speedup.csv").set_index("method")
    assert speed.loc["sprint", "flop_ratio"] > 1


@pytest.mark.parametrize("backbone", ["rwkv", "mamba", "lightningdit"])
def test_a_training_step_on_every_backbone_reaches_the_middle_blocks_and_the_fusion(backbone):
    net = sprint(backbone, path_drop_prob=0.0).train()
    den = build_objective("flow").wrap(randomize(net))
    x, _, y = inputs(4)
    loss = build_objective("flow").loss(den, x, y, build_objective("flow").draw(4, SHAPE, torch.Generator())).mean()
    loss.backward()
    assert net.fusion.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.backbone.blocks[2].parameters())
    assert net.mask_token.grad is None  # frozen, as the official code keeps it
    assert sprint(backbone, learn_mask_token=True).mask_token.requires_grad


def sprint_trainer(run_dir, steps):
    data = load_dataset("synthetic", 32, limit=32)
    torch.manual_seed(0)
    den = build_objective("edm").wrap(build_network("dit", "tiny", data.shape, data.num_classes, kind="sprint",
                                                    path_drop_prob=0.5))
    return Trainer(den, data, TrainConfig(steps=steps, global_batch=4, log_every=1, lr=1e-3), run_dir)


def test_resume_continues_the_same_token_draws(tmp_path):
    whole = sprint_trainer(tmp_path / "whole", 6)
    whole.train()
    half = sprint_trainer(tmp_path / "half", 3)
    half.train()
    resumed = sprint_trainer(tmp_path / "half", 6)
    resumed.raw.net.generator.manual_seed(99)  # the draws must come from the checkpoint
    assert resumed.try_resume()
    resumed.train()
    assert [s["loss"] for s in resumed.stats] == [s["loss"] for s in whole.stats]  # bit for bit


def test_rng_state_replays_and_shards_slice_the_global_draw():
    net = sprint(path_drop_prob=0.5, seed=4).train()
    x, t, y = inputs(4)
    _, state = rng_state_replays(net, x, t, y)
    half = sprint(path_drop_prob=0.5, seed=4).train()
    half.load_state_dict(net.state_dict())
    half.set_shard(1, 2)
    net.set_rng_state(state)
    with torch.no_grad():
        whole_out, (whole_mask,) = net(x, t, y, return_token_masks=True)
        half_out, (half_mask,) = half(x[2:], t[2:], y[2:], return_token_masks=True)
    assert torch.equal(whole_mask[2:], half_mask)  # tokens and path drop: rank 1 of 2 gets the second half
    assert torch.allclose(whole_out[2:], half_out, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    ({"drop_ratio": 1.0}, "sprint: drop_ratio = 1.0 must be in [0, 1)"),
    ({"dense_head": 3, "dense_tail": 3}, "leaves no sparse block in the backbone's 6 blocks; use dense_head + dense_tail <= 5"),
    ({"dense_head": 1.5}, "dense_head = 1.5 must be a whole number of blocks"),
    ({"grouping": "diagonal"}, "unknown grouping 'diagonal'; choose one of auto, structured, subgrid, rows, random"),
    ({"drop_ratio": 0.3}, "drop ratio 0.3 cannot be made by structured grouping on the 8x8 token grid"),
    ({"drop_ratio": 0.5, "grouping": "subgrid"}, "cannot be made by sub-grid grouping"),
    ({"group_size": 3}, "group_size = 3 must be a whole number >= 2 dividing the 8x8 token grid"),
    ({"path_drop_prob": -0.1}, "path_drop_prob = -0.1 must be in [0, 1)"),
    ({"learn_mask_token": "yes"}, "learn_mask_token = 'yes' must be true or false"),
])
def test_bad_arguments_are_one_line(args, message):
    with pytest.raises(ConfigError) as err:
        sprint(**args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_forced_rate_and_suite_entries_are_one_line(tmp_path):
    net = sprint().eval()
    with pytest.raises(ConfigError, match=r"force_rate 1.5 must be in \[0, 1\]"):
        net(*inputs(1), force_rate=1.5)
    with pytest.raises(ConfigError, match="drop ratio 0.3 cannot be made"):
        net(*inputs(1), force_rate=0.3)
    base = ["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs"]
    with pytest.raises(ConfigError, match="unknown key 'suite.methods.sprint.dropratio' for a method of kind sprint; "
                                          "did you mean 'drop_ratio'"):
        run(base + ["+suite.methods.sprint={kind:sprint,dropratio:0.5}"])
    with pytest.raises(ConfigError, match="sprint: dense_head 4 \\+ dense_tail 2 leaves no sparse block"):
        run(base + ["+suite.methods.sprint={kind:sprint,dense_head:4}"])
    with pytest.raises(ConfigError) as err:  # the README's bad-input table
        run(base + ["+suite.methods.sprint={kind:sprint,drop_ratio:0.3}"])
    assert str(err.value) == ("suite.methods.sprint: sprint: drop ratio 0.3 cannot be made by structured grouping on the 8x8 token grid "
                              "(each g x g group keeps k tokens, so the ratio must be 1 - k/g^2; g=2: 0.25, 0.5, 0.75; "
                              "g=4: a multiple of 1/16); choose such a drop_ratio or grouping: random")
    guidance = ["suite=guidance", "scale=tiny", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs"]
    with pytest.raises(ConfigError, match="suite.sampling.pdg_low.uncond_rate forces the rate of classifier-free "
                                          "guidance's unconditional branch; set cfg_scale != 1"):
        run(guidance + ["suite.sampling.pdg_low.cfg_scale=1.0"])
    with pytest.raises(ConfigError, match="suite.sampling.slow forces rate 0.3 on method sprint: sprint: drop ratio "
                                          "0.3 cannot be made by structured grouping"):
        run(guidance + ["+suite.sampling.slow={sparse_guidance:[0.3,0.75,1.5],methods:[sprint]}"])
    with pytest.raises(ConfigError, match="suite.sampling.slow forces rate 0.3 on method baseline: routing was "
                                          "forced but this model has no routes"):
        run(guidance + ["+suite.sampling.slow={sparse_guidance:[0.3,0.75,1.5]}"])
    with pytest.raises(ConfigError, match=r"suite.sampling.pdg_low.kinds = \['sprnt'\]: must be a non-empty list"):
        run(guidance + ["suite.sampling.pdg_low.kinds=[sprnt]"])
    with pytest.raises(ConfigError, match=r"suite.sampling.sg_a.methods = \['sprnt'\]: must be a non-empty list of "
                                          r"the suite's method entries \(the ones the mode applies to\), from: "
                                          "baseline, tread, sprint"):
        run(guidance + ["suite.sampling.sg_a.methods=[sprnt]"])
    assert not (tmp_path / "runs").exists()  # all refused before any training


