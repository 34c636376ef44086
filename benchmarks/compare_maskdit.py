"""Side-by-side with the official MaskDiT code (github Anima-Lab/MaskDiT): with the same weights and the same
forced token choice, our ``maskdit`` and ``drop`` methods give the official outputs, loss and gradients.

    python benchmarks/compare_maskdit.py --official /tmp/maskdit_official

The official checkout is imported from ``--official`` at run time (``models/maskdit.py`` and
``train_utils/loss.py``; they need torch, numpy and timm); none of its code lives in this repository. Their loss
reads ``net.module`` (it expects a DistributedDataParallel model): the official precond model is wrapped in
``torch.nn.DataParallel``, which on a machine without CUDA calls the module itself. Their ``get_mask`` (the
random token draw) is replaced by one returning the forced ids; ours by the same ids.

Compared, float32 on the CPU, DiT-S/2 (the official decoder is hard-coded: 8 blocks, width 512, 16 heads):
(a) the unmasked forward in eval mode, (b) the masked forward in training mode (mask ratio 0.5),
(c) the per-sample EDM training loss (denoising on kept tokens + 0.1 x MAE on dropped tokens) with the same
sigma and noise, and every mapped parameter's gradient; then the same for ``drop`` against the official model
without decoder (``use_decoder=False``, ``mae_loss_coef=0``). Last, parameter counts of DiT-XL/2 with and
without the decoder, official and ours (paper Table S7: 730M vs 675M).
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion.edm import EDMConfig, EDMDenoiser, edm_loss, sample_sigma  # noqa: E402
from tread_bench.methods import build_network  # noqa: E402

NUM_CLASSES, CHANNELS, SIZE = 1000, 4, 32
MASK_RATIO, MAE_WEIGHT = 0.5, 0.1
OFFICIAL_DECODER = dict(decoder_depth=8, decoder_width=512, decoder_heads=16)  # hard-coded in models/maskdit.py

# Official key (under EDMPrecond.model) -> ours. {i} is a block index. Every official parameter and every one
# of our parameters must be used exactly once; the label table is transposed (theirs: Linear on one-hot labels).
BACKBONE_KEYS = [
    ("x_embedder.proj.{w}", "backbone.x_embedder.proj.{w}"),
    ("t_embedder.mlp.0.{w}", "backbone.t_embedder.mlp.0.{w}"),
    ("t_embedder.mlp.2.{w}", "backbone.t_embedder.mlp.2.{w}"),
    ("y_embedder.embedding_table.weight", "backbone.y_embedder.table.weight"),
    ("blocks.{i}.attn.qkv.{w}", "backbone.blocks.{i}.attn.qkv.{w}"),
    ("blocks.{i}.attn.proj.{w}", "backbone.blocks.{i}.attn.proj.{w}"),
    ("blocks.{i}.mlp.fc1.{w}", "backbone.blocks.{i}.mlp.fc1.{w}"),
    ("blocks.{i}.mlp.fc2.{w}", "backbone.blocks.{i}.mlp.fc2.{w}"),
    ("blocks.{i}.adaLN_modulation.1.{w}", "backbone.blocks.{i}.adaLN_modulation.1.{w}"),
]
DECODER_KEYS = [
    ("decoder_layer.linear.{w}", "decoder_in.linear.{w}"),
    ("decoder_layer.adaLN_modulation.1.{w}", "decoder_in.adaLN_modulation.1.{w}"),
    ("decoder_blocks.{i}.attn.qkv.{w}", "decoder_blocks.{i}.attn.qkv.{w}"),
    ("decoder_blocks.{i}.attn.proj.{w}", "decoder_blocks.{i}.attn.proj.{w}"),
    ("decoder_blocks.{i}.mlp.fc1.{w}", "decoder_blocks.{i}.mlp.fc1.{w}"),
    ("decoder_blocks.{i}.mlp.fc2.{w}", "decoder_blocks.{i}.mlp.fc2.{w}"),
    ("decoder_blocks.{i}.adaLN_modulation.1.{w}", "decoder_blocks.{i}.adaLN_modulation.1.{w}"),
    ("final_layer.linear.{w}", "decoder_out.linear.{w}"),  # the decoder-width output layer
    ("final_layer.adaLN_modulation.1.{w}", "decoder_out.adaLN_modulation.1.{w}"),
    ("mask_token", "mask_token"),
]
NO_DECODER_KEYS = [
    ("final_layer.linear.{w}", "backbone.final_layer.linear.{w}"),  # without decoder: the backbone's head
    ("final_layer.adaLN_modulation.1.{w}", "backbone.final_layer.adaLN_modulation.1.{w}"),
]


def key_map(theirs: nn.Module, ours: nn.Module, table) -> dict:
    """Official parameter name -> our parameter name, every trainable parameter on both sides used once."""
    patterns = []
    for a, b in table:
        rx = re.escape(a).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{w\}", r"(?P<w>weight|bias)")
        patterns.append((re.compile("^" + rx + "$"), b))
    mapping = {}
    for key, param in theirs.named_parameters():
        if not param.requires_grad:  # pos_embed, decoder_pos_embed: frozen sin-cos tables, compared below
            continue
        hits = [(m, b) for p, b in patterns if (m := p.match(key))]
        if len(hits) != 1:
            raise SystemExit(f"official parameter {key} matches {len(hits)} key-map entries; update the key map")
        match, target = hits[0]
        mapping[key] = target.format(**match.groupdict())
    ours_keys = {k for k, _ in ours.named_parameters()}
    if set(mapping.values()) != ours_keys or len(set(mapping.values())) != len(mapping):
        raise SystemExit(f"key map is not one-to-one; ours unmapped: {sorted(ours_keys - set(mapping.values()))}")
    return mapping


def copy_weights(theirs: nn.Module, ours: nn.Module, mapping: dict) -> None:
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for key, value in theirs.named_parameters():
            if key not in mapping:
                continue
            target = params[mapping[key]]
            if key == "y_embedder.embedding_table.weight":  # (D, classes) on one-hot -> (classes + 1, D) table
                target[:NUM_CLASSES] = value.t()
                target[NUM_CLASSES] = 0  # our null label = their all-zero one-hot vector
            elif target.shape != value.shape:
                raise SystemExit(f"shape mismatch: official {key} {tuple(value.shape)} vs ours {mapping[key]}")
            else:
                target.copy_(value)


def load_official(path: Path):
    if not (path / "models" / "maskdit.py").is_file() or not (path / "train_utils" / "loss.py").is_file():
        raise SystemExit(f"--official {path} has no models/maskdit.py and train_utils/loss.py; check out "
                         "github Anima-Lab/MaskDiT there")
    sys.path.insert(0, str(path))
    return importlib.import_module("models.maskdit"), importlib.import_module("train_utils.loss")


def randomise_zero_init(model: nn.Module) -> None:
    """adaLN-Zero, the zero output layer and the zero decoder input layer make most of the network start as
    the identity (or zero): re-randomise them so every weight matters to the comparison."""
    for name, module in model.named_modules():
        if name.endswith("adaLN_modulation") or name.split(".")[-1] in ("final_layer", "decoder_layer"):
            for p in module.parameters():
                nn.init.normal_(p, std=0.05)


def forced_mask(batch: int, length: int, keep: int, gen: torch.Generator):
    """Ascending kept ids and the official mask dict (get_mask's format) that keeps exactly them."""
    order = torch.rand(batch, length, generator=gen).argsort(dim=1)
    ids_keep = order[:, :keep].sort(dim=1).values
    ids_drop = order[:, keep:].sort(dim=1).values
    ids_shuffle = torch.cat([ids_keep, ids_drop], dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, length)
    mask[:, :keep] = 0
    mask = mask.gather(1, ids_restore)
    return ids_keep, {"mask": mask, "ids_keep": ids_keep, "ids_restore": ids_restore}


def max_diff(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def compare(official, official_loss, kind: str, batch: int, seed: int) -> None:
    decoder = kind == "maskdit"
    torch.manual_seed(seed)
    theirs = official.EDMPrecond(SIZE, CHANNELS, NUM_CLASSES, model_type="DiT-S/2", use_decoder=decoder,
                                 mae_loss_coef=MAE_WEIGHT if decoder else 0)
    randomise_zero_init(theirs.model)
    args = dict(mask_ratio=MASK_RATIO, mae_weight=MAE_WEIGHT, **OFFICIAL_DECODER) if decoder else dict(rate=MASK_RATIO)
    ours = build_network("dit", "S/2", (CHANNELS, SIZE, SIZE), NUM_CLASSES, kind, **args)
    mapping = key_map(theirs.model, ours, BACKBONE_KEYS + (DECODER_KEYS if decoder else NO_DECODER_KEYS))
    copy_weights(theirs.model, ours, mapping)
    print(f"\n== {kind} vs official DiT-S/2 use_decoder={decoder}: {len(mapping)} parameters mapped "
          f"({sum(p.numel() for p in ours.parameters()):,} values)")
    pos_diff = max_diff(theirs.model.pos_embed, ours.backbone.pos_embed)
    print(f"pos_embed         official vs ours: max|diff| = {pos_diff:.3e}")
    if decoder:
        print(f"decoder_pos_embed official vs ours: max|diff| = "
              f"{max_diff(theirs.model.decoder_pos_embed, ours.decoder_pos_embed):.3e}")

    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, CHANNELS, SIZE, SIZE, generator=gen)
    sigma = (torch.randn(batch, generator=gen) * 1.2 - 1.2).exp()
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    y[-1] = NUM_CLASSES  # one unconditional sample: our null label, their zero one-hot
    onehot = torch.zeros(batch, NUM_CLASSES)
    onehot[y < NUM_CLASSES] = nn.functional.one_hot(y[y < NUM_CLASSES], NUM_CLASSES).float()
    n = ours.backbone.num_tokens
    ids, mask_dict = forced_mask(batch, n, n - int(n * MASK_RATIO), gen)
    official.get_mask = lambda *a, **k: mask_dict           # their forward_encoder looks it up in its module
    ours.draw = lambda b, rate, device: (ids, None)          # ascending ids, random selection (no grid)
    den = EDMDenoiser(ours)
    x_noisy = x + torch.randn(x.shape, generator=gen) * sigma[:, None, None, None]

    with torch.no_grad():
        theirs.eval(), ours.eval()
        ref = theirs(x_noisy, sigma, onehot)["x"]
        print(f"(a) unmasked forward, eval       max|diff| = {max_diff(den(x_noisy, sigma, y), ref):.3e} "
              f"(max|D| {ref.abs().max():.3f})")
        theirs.train(), ours.train()
        masked = theirs(x_noisy, sigma, onehot, mask_ratio=MASK_RATIO)["x"]
        print(f"(b) masked forward @{MASK_RATIO:g}, train   max|diff| = {max_diff(den(x_noisy, sigma, y), masked):.3e} "
              f"(masked vs unmasked differ by {max_diff(masked, ref):.3f}: the mask matters)")

    # (c) the official EDMLoss draws sigma, then noise, from the global generator; ours gets them from a
    # generator seeded the same way, in the same order.
    loss_seed = seed + 2
    theirs.zero_grad(), ours.zero_grad()
    torch.manual_seed(loss_seed)
    t_loss = official_loss.EDMLoss()(nn.DataParallel(theirs).train(), x, onehot, mask_ratio=MASK_RATIO,
                                     mae_loss_coef=MAE_WEIGHT if decoder else 0)
    g = torch.Generator().manual_seed(loss_seed)
    o_sigma = sample_sigma(batch, EDMConfig(), g)
    o_loss = edm_loss(den, x, y, o_sigma, torch.randn(x.shape, generator=g))
    t_loss.mean().backward(), o_loss.mean().backward()
    ours_params = dict(ours.named_parameters())
    grads = [(p.grad, ours_params[mapping[k]].grad, k) for k, p in theirs.model.named_parameters() if k in mapping]
    grad_diff = max(max_diff(a.t() if k.startswith("y_embedder") else a,
                             b[:NUM_CLASSES] if k.startswith("y_embedder") else b) for a, b, k in grads)
    grad_max = max(a.abs().max().item() for a, _, _ in grads)
    print(f"(c) per-sample loss {[round(v, 6) for v in t_loss.tolist()]}")
    print(f"    official vs ours max|diff| = {max_diff(t_loss, o_loss):.3e}; gradients max|diff| = {grad_diff:.3e} "
          f"(max|grad| {grad_max:.3e})")


def parameter_counts(official) -> None:
    print("\n== parameters, DiT-XL/2 (32x32x4 latents, 1000 classes)")
    with torch.device("meta"):
        for decoder in (False, True):
            theirs = official.DiT_models["DiT-XL/2"](input_size=SIZE, in_channels=CHANNELS, num_classes=NUM_CLASSES,
                                                     use_decoder=decoder, mae_loss_coef=MAE_WEIGHT if decoder else 0)
            kind, args = ("maskdit", OFFICIAL_DECODER) if decoder else ("tread", {"routes": []})
            ours = build_network("dit", "XL/2", (CHANNELS, SIZE, SIZE), NUM_CLASSES, kind, **args)
            trained = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
            total = sum(p.numel() for p in theirs.parameters())
            print(f"{'with' if decoder else 'without'} decoder: official {trained:,} trained ({total:,} with the "
                  f"frozen sin-cos tables); ours {sum(p.numel() for p in ours.parameters()):,}")
    print("(ours has one more label-table row, 1152 values: the null label; paper Table S7: 730M vs 675M)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="checkout of github Anima-Lab/MaskDiT")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    official, official_loss = load_official(args.official.resolve())
    print(f"official code: {args.official}; torch {torch.__version__}; float32, CPU")
    for kind in ("maskdit", "drop"):
        compare(official, official_loss, kind, args.batch, args.seed)
    parameter_counts(official)


if __name__ == "__main__":
    main()
