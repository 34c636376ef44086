"""Side-by-side with the official SPRINT code (github snap-research/Sprint, ``src/models/sit.py``): the same
weights and the same forced token choice give the same outputs, loss, gradients and guided samples.

    PYTHONPATH=<folder with einops> python benchmarks/compare_official_sprint.py --official /tmp/official_sprint

The official checkout is imported from ``--official`` at run time (``src/models/sit.py``,
``src/utils/utils.py``, ``src/scheduler/flow_matching.py``); none of its code lives in this repository. It
needs einops (``pip install --target <folder> einops`` keeps it out of the project's environment). Its
``norms.py`` imports triton for fused kernels SPRINT does not use; without triton an empty stand-in module is
registered and the first line says so.

Two backbones, each against an official ``SiT`` built to be the same network:

* ``dit`` (DiT-S/2, 12 blocks = 2 dense + 8 sparse + 2 dense): official SiT with ``rel_pos_embed=None``,
  no QK-norm, LayerNorm and the GELU MLP, which is a DiT block. DiT adds a fixed sin-cos position embedding
  after the patch projection and the official SiT has none (it places tokens by RoPE only): a forward hook
  on the official ``x_embedder`` adds our ``pos_embed`` buffer there (the one shim).
* ``lightningdit`` (XS/4 width, 12 blocks): official SiT with its 2-D RoPE, RMSNorm QK-norm, RMSNorm and
  SwiGLU (``use_swiglu=True, use_swiglu_large=False``), the configuration closest to the official SPRINT
  runs (which use RoPE + QK RMSNorm with LayerNorm and a GELU MLP); same pos-embed hook. Width 64: at 384
  LightningDiT's SwiGLU width int(2/3 * 4 * 384) = 1023 is one less than the official (4 * 384 * 2) // 3.
  The RoPE tables are the official module's own, gathered per kept token by ``mask_out_pos_token``;
  ours gathers its own table by the block-stack ``positions``: this checks that kept tokens keep their
  true positions.

Weights: a key map (every key on both sides used once, shapes checked): ``encoder_blocks.i`` ->
``backbone.blocks.i``, ``middle_blocks.i`` -> ``blocks.(2 + i)``, ``decoder_blocks.i`` ->
``blocks.(2 + middle + i)``, ``renoise_linear`` -> ``fusion``, ``mask_token`` -> ``mask_token``; the patch
projection is a Linear over (c, p1, p2) there and a Conv2d here (a reshape); the head's output features are
(c, p1, p2) there and (p1, p2, c) here (a row permutation). All weights are re-randomised (adaLN-Zero and the
zero head would hide the blocks). Printed, each as max |ours - theirs| (float32, CPU):

(a) grouping: the official ``get_structured_mask_with_random_offset`` and our ``structured_selection`` from
    the same seeded generator, at each ratio of the official table (its g and k are read by calling the
    official ``prepare_mask_and_input``): the kept sets must be identical;
(b) dense forward in eval mode (SPRINT's inference);
(c) training forward with the same forced kept ids and the same path-dropped samples (the official
    ``cfg_mask_prob`` draw, replayed);
(d) flow-matching loss and every parameter gradient (official ``FlowMatching.compute_loss``, uniform t, its
    mask function returning the shared ids) against our ``flow`` objective with the same t, noise and drop;
(e) path-drop guidance: official ``sample_ode(path_drop_guidance=True)`` (and plain CFG) against our flow
    Euler sampler with ``uncond_rate=1.0`` (and plain CFG), same noise, labels and steps.
Then the parameter counts of DiT-XL/2 with and without SPRINT (ours) and of the official SPRINT SiT-XL/2.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion.sampler import SamplerConfig  # noqa: E402
from tread_bench.methods import build_network  # noqa: E402
from tread_bench.methods.sprint import structured_groups, structured_selection  # noqa: E402
from diffusion import build_objective  # noqa: E402

NUM_CLASSES = 1000
# backbone -> (our size, input size, channels, official SiT keyword arguments making the same network)
SETUPS = {
    "dit": ("S/2", 32, 4, dict(hidden_size=384, num_heads=6, patch_size=2, rel_pos_embed=None,
                               norm_type="layernorm", q_norm=None, k_norm=None)),
    "lightningdit": ("XS/4", 32, 4, dict(hidden_size=64, num_heads=4, patch_size=4, rel_pos_embed="rope",
                                          norm_type="rmsnorm", q_norm="rmsnorm", k_norm="rmsnorm",
                                          use_swiglu=True, use_swiglu_large=False)),
}
DENSE_HEAD, DENSE_TAIL = 2, 2

# official key -> ours; {i}: a block index within its group (shifted by the group's first block here)
BLOCK_GROUPS = {"encoder_blocks": 0, "middle_blocks": DENSE_HEAD, "decoder_blocks": None}  # None: depth - tail
KEY_MAP = [
    ("mask_token", "mask_token"),
    ("renoise_linear.weight", "fusion.weight"),
    ("renoise_linear.bias", "fusion.bias"),
    ("x_embedder.proj.weight", "backbone.x_embedder.proj.weight"),      # Linear (D, C*p*p) vs Conv2d (D, C, p, p)
    ("x_embedder.proj.bias", "backbone.x_embedder.proj.bias"),
    ("t_embedder.mlp.{n}.weight", "backbone.t_embedder.mlp.{n}.weight"),
    ("t_embedder.mlp.{n}.bias", "backbone.t_embedder.mlp.{n}.bias"),
    ("y_embedder.embedding_table.weight", "backbone.y_embedder.table.weight"),
    ("final_layer.linear.weight", "backbone.final_layer.linear.weight"),  # rows (c, p1, p2) vs (p1, p2, c)
    ("final_layer.linear.bias", "backbone.final_layer.linear.bias"),
    ("final_layer.adaLN_modulation.1.weight", "backbone.final_layer.adaLN_modulation.1.weight"),
    ("final_layer.adaLN_modulation.1.bias", "backbone.final_layer.adaLN_modulation.1.bias"),
    ("final_layer.norm_final.weight", "backbone.final_layer.norm.weight"),  # RMSNorm scale (lightningdit)
    ("{group}.{i}.{rest}", "backbone.blocks.{j}.{rest}"),  # same names inside a block: attn.qkv, mlp.fc1, ...
]


def load_official(path: Path):
    """Import the official modules; returns (sit, utils, flow_matching, note)."""
    if not (path / "src" / "models" / "sit.py").is_file():
        raise SystemExit(f"--official {path} has no src/models/sit.py; check out github snap-research/Sprint there")
    try:
        import einops  # noqa: F401
    except ImportError:
        raise SystemExit("the official code needs einops: pip install --target /tmp/sprint_deps einops, then "
                         "PYTHONPATH=/tmp/sprint_deps python benchmarks/compare_official_sprint.py ...") from None
    note = "triton imported"
    try:
        import triton  # noqa: F401
    except ImportError:  # norms.py imports it for fused kernels that SPRINT's SiT does not call
        stub = types.ModuleType("triton")
        stub.language = types.ModuleType("triton.language")
        stub.jit = lambda fn=None, **kw: fn
        sys.modules.update({"triton": stub, "triton.language": stub.language})
        note = "triton missing: an empty stand-in module was registered (only fused kernels use it)"
    sys.path.insert(0, str(path))
    sit = importlib.import_module("src.models.sit")
    return sit, importlib.import_module("src.utils.utils"), importlib.import_module("src.scheduler.flow_matching"), note


def build_pair(sit, backbone: str, path_drop: float):
    size, input_size, channels, official_args = SETUPS[backbone]
    ours = build_network(backbone, size, (channels, input_size, input_size), NUM_CLASSES, kind="sprint",
                         dense_head=DENSE_HEAD, dense_tail=DENSE_TAIL, path_drop_prob=path_drop)
    depth = ours.backbone.depth
    theirs = sit.SiT(context_size=input_size, in_channels=channels, num_classes=NUM_CLASSES, class_dropout_prob=0.1,
                     encoder_depth=DENSE_HEAD, middle_depth=depth - DENSE_HEAD - DENSE_TAIL,
                     decoder_depth=DENSE_TAIL, cfg_mask_prob=path_drop, **official_args)
    # labels are dropped by our trainer, not the network: no random label dropout inside the official forward
    # (the table keeps its null row, so classifier-free guidance works the same)
    theirs.y_embedder.dropout_prob = 0.0
    pos_embed = ours.backbone.pos_embed
    theirs.x_embedder.register_forward_hook(lambda module, args, out: out + pos_embed)  # DiT's sin-cos embedding
    return ours, theirs


def map_keys(theirs: dict, ours: dict, depth: int) -> dict:
    starts = {**BLOCK_GROUPS, "decoder_blocks": depth - DENSE_TAIL}
    mapping = {}
    for key in theirs:
        block = re.match(r"^(encoder_blocks|middle_blocks|decoder_blocks)\.(\d+)\.(.+)$", key)
        if block:
            group, i, rest = block.groups()
            mapping[key] = f"backbone.blocks.{starts[group] + int(i)}.{rest}"
            continue
        hits = [b.replace("{n}", m.group(1)) if m.groups() else b
                for a, b in KEY_MAP[:-1] if (m := re.match("^" + re.escape(a).replace(r"\{n\}", r"(\d+)") + "$", key))]
        if len(hits) != 1:
            raise SystemExit(f"official key {key} matches {len(hits)} KEY_MAP entries; update KEY_MAP")
        mapping[key] = hits[0]
    missing = set(ours) - set(mapping.values())
    if missing or len(set(mapping.values())) != len(mapping):
        raise SystemExit(f"KEY_MAP does not cover our keys one-to-one; unmapped: {sorted(missing)}")
    return mapping


def to_ours(key: str, value: torch.Tensor, target: torch.Tensor, channels: int, patch: int) -> torch.Tensor:
    if key == "x_embedder.proj.weight":
        return value.reshape(target.shape)  # (D, C*p*p) in (c, p1, p2) order = Conv2d (D, C, p, p)
    if key.startswith("final_layer.linear."):  # output features (c, p1, p2) -> (p1, p2, c)
        rest = value.shape[1:]
        return value.reshape(channels, patch, patch, *rest).permute(1, 2, 0, *range(3, 3 + len(rest))).reshape(value.shape)
    return value.reshape(target.shape)


def copy_weights(theirs: nn.Module, ours: nn.Module, backbone: str, seed: int) -> int:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # re-randomise: adaLN-Zero and the zero head would make the blocks invisible
        for name, p in theirs.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if re.search(r"norm\w*\.weight$", name) else 0.05 * noise)  # RMSNorm scales ~1
    t_sd, o_sd = theirs.state_dict(), ours.state_dict()
    mapping = map_keys(t_sd, o_sd, ours.backbone.depth)
    _, _, channels, args = SETUPS[backbone]
    converted = {}
    for key, target in mapping.items():
        value = to_ours(key, t_sd[key], o_sd[target], channels, args["patch_size"])
        if value.shape != o_sd[target].shape:
            raise SystemExit(f"shape mismatch: official {key} {tuple(t_sd[key].shape)} vs ours {target} {tuple(o_sd[target].shape)}")
        converted[target] = value
    ours.load_state_dict(converted, strict=True)
    return len(mapping)


def official_mask_dict(ids: torch.Tensor, n: int) -> dict:
    """The official mask_dict (ids_keep, ids_restore) for our kept ids: restore = inverse of cat(keep, remove)."""
    b = ids.shape[0]
    keep = torch.zeros(b, n, dtype=torch.bool).scatter_(1, ids, True)
    remove = torch.arange(n).expand(b, n)[~keep].view(b, -1)
    perm = torch.cat([ids, remove], dim=1)
    return {"ids_keep": ids, "ids_restore": perm.argsort(dim=1)}


def max_diff(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def grouping(utils, seed: int) -> None:
    table = {}
    real = utils.get_structured_mask_with_random_offset

    def capture(group_size, selection_per_group, **kwargs):
        table[ratio] = (group_size, selection_per_group)
        return real(group_size=group_size, selection_per_group=selection_per_group, **kwargs)

    utils.get_structured_mask_with_random_offset = capture
    try:
        for ratio in (0.5, 0.625, 0.75, 0.875):
            utils.prepare_mask_and_input(images=torch.zeros(1, 4, 32, 32), mask_type="structured_with_random_offset",
                                         mask_ratio=ratio)
    finally:
        utils.get_structured_mask_with_random_offset = real
    for ratio, (g, k) in table.items():
        ours_gk = structured_groups(ratio, (16, 16))
        tokens = torch.zeros(8, 256, 4)
        theirs = real(x=tokens, group_size=g, selection_per_group=k, generator=torch.Generator().manual_seed(seed))
        mine = structured_selection(8, (16, 16), g, k, torch.Generator().manual_seed(seed), "cpu")
        same = torch.equal(theirs["ids_keep"].sort(dim=1).values, mine)
        print(f"(a) ratio {ratio}: official g={g}, k={k}; ours {ours_gk}; same kept ids from the same generator: {same}")


def compare(sit, flow_matching, backbone: str, batch: int, seed: int, path_drop: float, steps: int,
            scale: float) -> None:
    torch.manual_seed(seed)
    ours, theirs = build_pair(sit, backbone, path_drop)
    count = copy_weights(theirs, ours, backbone, seed)
    size, input_size, channels, _ = SETUPS[backbone]
    n = ours.backbone.num_tokens
    print(f"\n== {backbone} {size}: {ours.describe()}, {ours.backbone.depth} blocks, {n} tokens; "
          f"{count} tensors mapped, all shapes equal")
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, channels, input_size, input_size, generator=gen)
    t = torch.rand(batch, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    g, k = structured_groups(ours.drop_ratio, ours.backbone.grid_size)
    ids = structured_selection(batch, ours.backbone.grid_size, g, k, gen, "cpu")
    mask_dict = official_mask_dict(ids, n)
    ours._select = lambda b, rate, device: (ids, None)  # the same forced kept ids in both

    with torch.no_grad():
        theirs.eval(), ours.eval()
        ref = theirs(x, t, y)[0]
        print(f"(b) dense forward, eval                max|diff| = {max_diff(ours(x, t, y), ref):.3e}  "
              f"(max|out| {ref.abs().max():.3f})")
        theirs.train(), ours.train()
        torch.manual_seed(seed + 2)  # the official path drop: torch.rand(B) < cfg_mask_prob inside forward
        sparse = theirs(x, t, y, mask_dict=mask_dict)[0]
        dropped = torch.rand(batch, generator=torch.Generator().manual_seed(seed + 2)) < path_drop
        ours._path_dropped = lambda b, device: dropped
        print(f"(c) training forward, forced ids, {int(dropped.sum())}/{batch} path-dropped  max|diff| = "
              f"{max_diff(ours(x, t, y), sparse):.3e}  (sparse vs dense differ by {max_diff(sparse, ref):.3f})")

    # (d) loss and gradients: official compute_loss draws t ~ U[0, 1], noise, then (in forward) the path drop
    theirs.zero_grad(), ours.zero_grad()
    fm = flow_matching.FlowMatching(prediction="v", path_type="linear", weighting="uniform")
    fm.accelerator = types.SimpleNamespace(autocast=lambda: torch.autocast("cpu", enabled=False))  # float32
    real_mask = flow_matching.prepare_mask_and_input
    flow_matching.prepare_mask_and_input = lambda **kwargs: mask_dict
    try:
        torch.manual_seed(seed + 3)
        t_loss, _ = fm.compute_loss(theirs, x, {"y": y}, mask_config=types.SimpleNamespace(
            mask_ratio=ours.drop_ratio, mask_type="structured_with_random_offset"))
    finally:
        flow_matching.prepare_mask_and_input = real_mask
    replay = torch.Generator().manual_seed(seed + 3)
    objective = build_objective("flow")
    draws = objective.draw(batch, tuple(x.shape[1:]), replay)
    dropped = torch.rand(batch, generator=replay) < path_drop
    ours._path_dropped = lambda b, device: dropped
    o_loss = objective.loss(objective.wrap(ours), x, y, draws).mean()
    t_loss.backward(), o_loss.backward()
    mapping = map_keys(theirs.state_dict(), ours.state_dict(), ours.backbone.depth)
    o_named = dict(ours.named_parameters())
    _, _, _, args = SETUPS[backbone]
    grad_diff = max(max_diff(to_ours(k, p.grad, o_named[mapping[k]], channels, args["patch_size"]),
                             o_named[mapping[k]].grad)
                    for k, p in theirs.named_parameters() if p.grad is not None)
    grad_max = max(p.grad.abs().max().item() for p in theirs.parameters() if p.grad is not None)
    print(f"(d) flow loss {t_loss.item():.6f} vs {o_loss.item():.6f}: |diff| = {abs(t_loss.item() - o_loss.item()):.3e};"
          f" gradients max|diff| = {grad_diff:.3e} (max|grad| {grad_max:.3e}; {int(dropped.sum())} path-dropped)")

    # (e) guided sampling: official Euler ODE (t from 1 to 0) vs our flow Euler sampler, same noise and labels
    theirs.eval(), ours.eval()
    noise = torch.randn(batch, channels, input_size, input_size, generator=gen)
    euler = build_objective("flow", solver="euler")
    den = euler.wrap(ours)
    for name, pdg in (("path-drop guidance", True), ("classifier-free guidance", False)):
        with torch.no_grad():
            official = fm.sample_ode(theirs, noise, y, num_steps=steps, cfg_scale=scale, path_drop_guidance=pdg)
            sampler = SamplerConfig(steps=steps, cfg_scale=scale, uncond_rate=1.0 if pdg else None)
            mine = euler.sample(den, noise, y, sampler, null_label=NUM_CLASSES)
        print(f"(e) {name}, {steps} Euler steps, scale {scale:g}: samples max|diff| = {max_diff(mine, official):.3e} "
              f"(max|x| {official.abs().max():.3f})")


def parameter_counts(sit) -> None:
    shape = (4, 32, 32)
    with torch.device("meta"):
        plain = build_network("dit", "XL/2", shape, NUM_CLASSES, routes=[])
        sprint = build_network("dit", "XL/2", shape, NUM_CLASSES, kind="sprint")
        official = sit.SiT(hidden_size=1152, num_heads=16, context_size=32, patch_size=2, encoder_depth=2,
                           middle_depth=24, decoder_depth=2, q_norm="rmsnorm", k_norm="rmsnorm")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"\nparameters: DiT-XL/2 {count(plain):,}; DiT-XL/2 + SPRINT {count(sprint):,} "
          f"(+{count(sprint) - count(plain):,}: fusion 2D*D + D, mask token D); official SPRINT SiT-XL/2 "
          f"(RoPE, QK RMSNorm, as its configs) {count(official):,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="checkout of github snap-research/Sprint")
    ap.add_argument("--backbones", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--path-drop", type=float, default=0.5, help="path-drop probability in (c) and (d)")
    ap.add_argument("--steps", type=int, default=4, help="Euler steps of the sampling comparison (e)")
    ap.add_argument("--scale", type=float, default=3.0, help="guidance scale (the official eval configs: 3.0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sit, utils, flow_matching, note = load_official(args.official.resolve())
    print(f"official code: {args.official} ({note}); torch {torch.__version__}; float32 CPU")
    grouping(utils, args.seed)
    for backbone in args.backbones:
        compare(sit, flow_matching, backbone, args.batch, args.seed, args.path_drop, args.steps, args.scale)
    parameter_counts(sit)


if __name__ == "__main__":
    main()
