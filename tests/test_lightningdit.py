"""LightningDiT: a routed block rotates every kept token by its true grid position.

The reference below recomputes one block from its weights with explicit per-token rotation matrices
and per-sample, per-head attention in float64; it shares no code with backbones/lightningdit.py.
"""
import math

import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from backbones import backbone_sizes, build_backbone, list_backbones
from backbones.lightningdit import LightningDiT, LightningDiTBlock, axial_rope_angles
from routing import RoutedNetwork
from suite_helpers import run

THETA = 10000.0


def rotation_matrix(head_dim, row, col):
    """Block-diagonal 2-D axial RoPE rotation for one token at (row, col): the first half of the
    channels turns by row * f_i, the second half by col * f_i, pairs (2i, 2i+1), f_i = theta^(-4i/head_dim)."""
    quarter = head_dim // 4
    rot = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    for half, pos in ((0, row), (1, col)):
        for i in range(quarter):
            angle = pos * THETA ** (-2 * i / (head_dim // 2))
            a = half * (head_dim // 2) + 2 * i
            c, s = math.cos(angle), math.sin(angle)
            rot[a, a], rot[a, a + 1], rot[a + 1, a], rot[a + 1, a + 1] = c, -s, s, c
    return rot


def rms(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def literal_block(block, x, c, positions, cols):
    """The block's output computed by hand: x (B, n, D), c (B, D), positions (B, n) in the full grid."""
    w = {k: v.detach().double() for k, v in block.state_dict().items()}
    heads = block.attn.num_heads
    b, n, d = x.shape
    hd = d // heads
    out = torch.empty(b, n, d, dtype=torch.float64)
    for s in range(b):
        xs = x[s].double()
        cs = F.silu(c[s].double())
        mod = cs @ w["adaLN_modulation.1.weight"].T + w["adaLN_modulation.1.bias"]
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6)
        h = rms(xs, w["norm1.weight"]) * (1 + sc1) + sh1
        qkv = h @ w["attn.qkv.weight"].T + w["attn.qkv.bias"]
        q_all, k_all, v_all = qkv.split(d, dim=-1)
        rots = [rotation_matrix(hd, int(p) // cols, int(p) % cols) for p in positions[s]]
        attn_out = torch.empty(n, d, dtype=torch.float64)
        for head in range(heads):
            sl = slice(head * hd, (head + 1) * hd)
            q = rms(q_all[:, sl], w["attn.q_norm.weight"])
            k = rms(k_all[:, sl], w["attn.k_norm.weight"])
            q = torch.stack([rots[t] @ q[t] for t in range(n)])
            k = torch.stack([rots[t] @ k[t] for t in range(n)])
            scores = torch.empty(n, n, dtype=torch.float64)
            for i in range(n):
                for j in range(n):
                    scores[i, j] = q[i].dot(k[j]) / math.sqrt(hd)
            attn_out[:, sl] = scores.softmax(dim=-1) @ v_all[:, sl]
        xs = xs + g1 * (attn_out @ w["attn.proj.weight"].T + w["attn.proj.bias"])
        h = rms(xs, w["norm2.weight"]) * (1 + sc2) + sh2
        gate = h @ w["mlp.fc1_g.weight"].T + w["mlp.fc1_g.bias"]
        val = h @ w["mlp.fc1_x.weight"].T + w["mlp.fc1_x.bias"]
        out[s] = xs + g2 * ((F.silu(gate) * val) @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"])
    return out


def random_tiny(seed=0):
    """Tiny LightningDiT (8x8 tokens, 4 heads of 16) in float64 with every weight random (gates open)."""
    torch.manual_seed(seed)
    model = build_backbone("lightningdit", "tiny", input_size=32, in_channels=1, num_classes=10).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)  # RMSNorm scales around 1, the rest around 0
    # the cos/sin table is float32 (then cast); recompute it in float64 so the comparison can be tight
    angles = axial_rope_angles(16, (8, 8))
    model.rope.cos, model.rope.sin = angles.cos(), angles.sin()
    return model


def inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 1, 32, 32, generator=g, dtype=torch.float64), torch.randn(batch, generator=g,
            dtype=torch.float64), torch.tensor([3, 7][:batch]))


def routed_block_call(model, block_idx=2, seed=5):
    """Run a random-selection route r(1->3)@0.5 and capture block ``block_idx``'s call and output."""
    seen = {}
    hook = model.blocks[block_idx].register_forward_hook(
        lambda m, args, out: seen.update(args=tuple(a.clone() if torch.is_tensor(a) else a for a in args), out=out))
    net = RoutedNetwork(model, [dict(start=1, end=3, rate=0.5)], selection="auto", seed=seed).train()
    assert net.selection == "random"
    with torch.no_grad():
        _, (mask,) = net(*inputs(), return_token_masks=True)
    hook.remove()
    kept_ids = torch.stack([m.flatten().nonzero().squeeze(1) for m in mask])
    return seen, kept_ids


def test_routed_block_equals_literal_rope_at_true_positions():
    model = random_tiny()
    seen, kept_ids = routed_block_call(model)
    x, c, grid, positions = seen["args"]
    assert grid is None and x.shape[1] == 32
    assert torch.equal(positions, kept_ids)  # the router handed the block the kept tokens' own indices
    expected = literal_block(model.blocks[2], x, c, kept_ids, cols=8)
    diff = (seen["out"] - expected).abs().max().item()
    assert diff < 1e-10, diff
    print(f"routed block vs literal RoPE at true positions: max|diff| = {diff:.2e} "
          f"(max|out| {expected.abs().max():.2f})")
    # and the block really depends on them: rotating by 0..n-1 (positions lost) gives another result
    wrong = literal_block(model.blocks[2], x, c, torch.arange(32).expand(2, 32), cols=8)
    assert (seen["out"] - wrong).abs().max().item() > 1e-3
    with torch.no_grad():
        assert (model.blocks[2](x, c, None, torch.arange(32).expand(2, 32)) - seen["out"]).abs().max() > 1e-3


def test_full_sequence_block_equals_literal_rope():
    model = random_tiny(seed=1)
    tokens, cond = model.embed(*inputs())
    full = torch.arange(64).expand(2, 64)
    with torch.no_grad():
        out = model.blocks[0](tokens, cond, model.grid_size, full)
        default = model.blocks[0](tokens, cond)  # positions omitted: the full sequence
    expected = literal_block(model.blocks[0], tokens.detach(), cond.detach(), full, cols=8)
    assert (out - expected).abs().max().item() < 1e-10
    assert torch.equal(out, default)


def test_rope_attention_logits_depend_only_on_relative_position():
    """Moving every token of a sample by the same grid offset leaves a RoPE block's output unchanged
    (sin-cos is added only in embed); a different relative layout changes it."""
    block = random_tiny(seed=2).blocks[1]
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 6, 64, generator=g, dtype=torch.float64), torch.randn(1, 64, generator=g, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 9, 10, 18, 27]])
    with torch.no_grad():
        ref = block(x, c, None, pos)
        shifted = block(x, c, None, pos + 8 * 2 + 3)       # 2 rows down, 3 columns right
        other = block(x, c, None, torch.tensor([[0, 1, 2, 3, 4, 5]]))
    assert (ref - shifted).abs().max() < 1e-10
    assert (ref - other).abs().max() > 1e-3


def test_stored_float32_table_matches_the_literal_rotations():
    model = build_backbone("lightningdit", "tiny", input_size=32, in_channels=1, num_classes=10)
    assert model.rope.cos.dtype == torch.float32 and model.rope.cos.shape == (64, 16)
    for p in range(64):
        rot = rotation_matrix(16, p // 8, p % 8)
        assert torch.allclose(model.rope.cos[p].double(), rot.diagonal(), atol=1e-6)
        assert torch.allclose(model.rope.sin[p, 0::2].double(), rot.diagonal(-1)[0::2], atol=1e-6)  # R[2i+1, 2i]
        assert torch.equal(model.rope.sin[p, 1::2], model.rope.sin[p, 0::2])  # one angle per pair


def test_routed_bf16_autocast_forward_and_backward_are_finite():
    model = random_tiny(seed=3).float()
    net = RoutedNetwork(model, [dict(start=1, end=3, rate=0.5)]).train()
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x.float(), t.float(), y)
    out.float().square().mean().backward()
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_sizes_params_and_identity_at_init():
    assert list_backbones()["lightningdit"] == list_backbones()["dit"]
    assert set(backbone_sizes("lightningdit")) >= {"S/2", "B/2", "L/2", "XL/2", "tiny"}
    for size in ("S/2", "B/2", "XL/2"):
        with torch.device("meta"):
            ours, dit = build_backbone("lightningdit", size), build_backbone("dit", size)
        assert ours.depth == dit.depth and ours.hidden_size == dit.hidden_size and ours.grid_size == (16, 16)
        assert ours.blocks[0].attn.num_heads == dit.blocks[0].attn.num_heads
        p_ours, p_dit = (sum(p.numel() for p in m.parameters()) for m in (ours, dit))
        # SwiGLU at 2/3 width has DiT's MLP parameters; the rest is norm scales (and a rounded width)
        assert 0 < p_ours - p_dit < 0.002 * p_dit, (size, p_ours, p_dit)
    with torch.device("meta"):
        b2 = build_backbone("lightningdit", "B/2")
    assert abs(sum(p.numel() for p in b2.parameters()) / 1e6 - 130.3) < 0.1
    assert isinstance(b2, LightningDiT) and not b2.scan_mixing
    model = build_backbone("lightningdit", "tiny", input_size=32, in_channels=1, num_classes=10)
    assert all(isinstance(b, LightningDiTBlock) for b in model.blocks)
    assert all(b.attn.rope is model.rope for b in model.blocks)  # one table for the whole stack
    tokens, cond = model.embed(*(t.float() if t.is_floating_point() else t for t in inputs()))
    for block in model.blocks:  # adaLN-Zero: every block is exactly the identity at init
        assert torch.equal(block(tokens, cond, model.grid_size, torch.arange(64).expand(2, 64)), tokens)


def test_head_dim_must_allow_two_axes_of_pairs():
    with pytest.raises(ValueError, match="divisible by 4"):
        LightningDiT(depth=1, hidden_size=24, num_heads=4, patch_size=4)


def test_lightningdit_trains_with_tread_through_the_arch_agnostic_suite(tmp_path):
    code = run(["suite=arch_agnostic", "scale=tiny", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs",
                "only=lightningdit", "suite.train.steps=12", "suite.data.name=synthetic", "suite.data.limit=64",
                "suite.eval.every=0"])
    assert code == 0
    table = pd.read_csv(tmp_path / "results" / "arch_agnostic_runs.csv")
    assert set(table.backbone) == {"lightningdit"} and set(table.status) == {"ok"}
    assert sorted(set(table.method)) == ["baseline", "tread"]
    tread = table[table.method == "tread"]
    assert set(tread.setting) == {"r(2->2)@0.5"} and set(tread.selection) == {"random"}
    assert (table.steps == 12).all() and table.final_loss.notna().all()
