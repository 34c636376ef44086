"""MaskDiT (Zheng et al., "Fast Training of Diffusion Models with Masked Transformers", TMLR 2024; github
Anima-Lab/MaskDiT, ``models/maskdit.py`` and ``train_utils/loss.py``) as a method plug-in, on any backbone.

The backbone's blocks see only the kept tokens (``mask_ratio`` of them dropped); a decoder of DiT blocks then runs
on the full sequence, with a learned mask token at the dropped positions, and replaces the backbone's head. Loss:
the objective's loss on the kept tokens + ``mae_weight`` x the official MAE term on the dropped ones.
Details: docs/internals.md#tread_benchmethodsmaskditpy
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from backbones.dit import DiTBlock
from backbones.layers import modulate, sincos_pos_embed_2d, unpatchify, xavier_linear
from backbones.protocol import BlockStack, full_positions
from tread_bench.core.errors import ConfigError
from routing.router import gather_tokens, scatter_tokens

from .drop import TokenDropper
from .registry import LossTerms, register_method


class ModulatedLinear(nn.Module):
    """LayerNorm with adaLN shift/scale from the conditioning, then a Linear: the official ``DecoderLayer``
    (backbone width -> decoder width) and ``FinalLayer`` (decoder width -> patch pixels) are both this."""

    def __init__(self, width: int, out: int, cond_width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_width, 2 * width))
        self.linear = nn.Linear(width, out)

    def zero_init(self) -> None:
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DecoderBlock(DiTBlock):
    """DiT's block at the decoder width, its adaLN modulation fed by the backbone's (wider) conditioning."""

    def __init__(self, width: int, num_heads: int, cond_width: int, mlp_ratio: float = 4.0):
        super().__init__(width, num_heads, mlp_ratio)
        self.adaLN_modulation[-1] = nn.Linear(cond_width, 6 * width)


def patches(images: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, rows * cols, C * ph * pw): each token's pixels (the order inside a patch does not
    matter to the MAE term: a per-patch mean, variance and element-wise difference)."""
    b, c, h, w = images.shape
    rows, cols = grid
    x = images.reshape(b, c, rows, h // rows, cols, w // cols)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, -1)


@dataclass
class MaskedAutoencoderTerms(LossTerms):
    """MaskDiT's loss: the main term on the kept tokens (``token_weights``) plus ``mae_weight`` x the official
    ``mae_loss(norm_pix_loss=True)`` on the ``dropped`` tokens (B, rows, cols)."""

    dropped: Optional[torch.Tensor] = None
    mae_weight: float = 0.1

    def auxiliary(self, prediction: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        grid = tuple(self.dropped.shape[-2:])
        target = patches(noisy.to(prediction.dtype), grid)
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = ((patches(prediction, grid) - target) ** 2).mean(dim=-1)  # (B, N)
        dropped = self.dropped.flatten(1).to(per_patch.dtype)
        return self.mae_weight * (per_patch * dropped).sum(dim=1) / dropped.sum(dim=1)


def _probe(backbone: BlockStack) -> Tuple[int, int, List[str]]:
    """(token width, conditioning width, names of the parameters only the head uses), from one zero image
    embedded where the backbone lives (the meta device too) and the head run on the result: a parameter is
    the head's alone if the head's output depends on it and the embedding's does not, outside the blocks."""
    device = next(iter(backbone.parameters())).device
    size = backbone.input_size
    x = torch.zeros(1, backbone.in_channels, size, size, device=device)
    named = [(name, p) for name, p in backbone.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    def used(output):
        if not output.requires_grad:
            return [None] * len(params)
        return torch.autograd.grad(output.sum(), params, allow_unused=True)

    with torch.enable_grad():
        tokens, cond = backbone.embed(x, torch.zeros(1, device=device), torch.zeros(1, dtype=torch.long, device=device))
        by_embed = used(torch.cat([tokens.flatten(), cond.flatten()]))
        by_head = used(backbone.head(tokens.detach(), cond.detach()))
    in_blocks = {id(p) for p in backbone.blocks.parameters()}
    head_only = [name for (name, p), e, h in zip(named, by_embed, by_head)
                 if h is not None and e is None and id(p) not in in_blocks]
    return int(tokens.shape[-1]), int(cond.shape[-1]), head_only


def _to_buffers(module: nn.Module, names: List[str]) -> None:
    """Turn the named parameters of ``module`` into persistent buffers (same values, same state-dict keys)."""
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        value = getattr(owner, leaf).detach()
        delattr(owner, leaf)
        owner.register_buffer(leaf, value)


def _whole(kind: str, name: str, value, least: int, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
        raise ConfigError(f"{kind}: {name} = {value!r} must be a whole number >= {least}; e.g. {name}: {example}")
    return int(value)


#: the official decoder's head width (512 wide, 16 heads): ``decoder_heads: auto`` gives heads of this width, and a
#: decoder width given as a fraction of the backbone's is rounded to a multiple of it
HEAD_WIDTH = 32


def _decoder_size(name: str, value, backbone_size: int, multiple: int, example: str) -> int:
    """A whole number, or a fraction ``"a/b"`` of the backbone's depth or width rounded to a multiple of
    ``multiple`` (one at least): the same decoder rule then fits every backbone size."""
    if not isinstance(value, str):
        return _whole("maskdit", name, value, 1, example)
    try:
        fraction = Fraction(value)
    except (ValueError, ZeroDivisionError):
        fraction = Fraction(0)
    if fraction <= 0:
        raise ConfigError(f"maskdit: {name} = {value!r} must be a whole number or a positive fraction of the "
                          f"backbone's like '1/3'; e.g. {name}: {example}")
    return max(1, round(fraction * backbone_size / multiple)) * multiple


@register_method("maskdit")
class MaskDiT(TokenDropper):
    """``mask_ratio`` of the tokens dropped before the backbone's blocks; a light DiT decoder over the full
    sequence (mask tokens at the dropped positions) makes the output; MAE term on the dropped tokens."""

    def __init__(self, backbone: BlockStack, mask_ratio: float = 0.5, decoder_depth: Union[int, str] = 8,
                 decoder_width: Union[int, str] = 512, decoder_heads: Union[int, str] = 16, mae_weight: float = 0.1,
                 selection: str = "auto", seed: int = 0):
        """``decoder_depth`` and ``decoder_width``: whole numbers, or fractions of the backbone's depth and width
        (``"1/3"``, ``"5/12"``; the width then rounded to a multiple of HEAD_WIDTH); ``decoder_heads``: a whole
        number, or ``auto`` for heads HEAD_WIDTH wide."""
        super().__init__(backbone, "maskdit", selection, seed)
        self.mask_ratio = self.check_rate("mask_ratio", mask_ratio)
        self.decoder_depth = _decoder_size("decoder_depth", decoder_depth, backbone.depth, 1, "8")
        token_width, cond_width, head_only = _probe(backbone)
        width = self.decoder_width = _decoder_size("decoder_width", decoder_width, token_width, HEAD_WIDTH, "512")
        if decoder_heads == "auto":
            if width % HEAD_WIDTH:
                raise ConfigError(f"maskdit: decoder_heads auto needs a decoder width that is a multiple of "
                                  f"{HEAD_WIDTH}, got {width}; set decoder_heads to a whole number")
            decoder_heads = width // HEAD_WIDTH
        heads = self.decoder_heads = _whole("maskdit", "decoder_heads", decoder_heads, 1, "16 (or auto)")
        if width % 4 or width % heads:
            raise ConfigError(f"maskdit: decoder_width {width} must be a multiple of 4 (the 2-D sin-cos embedding) and "
                              f"of decoder_heads {heads}; e.g. decoder_width: 512, decoder_heads: 16")
        if isinstance(mae_weight, bool) or not isinstance(mae_weight, Real) or mae_weight < 0:
            raise ConfigError(f"maskdit: mae_weight = {mae_weight!r} must be a number >= 0 (the weight of the MAE "
                              "term on the dropped tokens); e.g. mae_weight: 0.1")
        self.mae_weight = float(mae_weight)
        rows, cols = backbone.grid_size
        size = backbone.input_size
        if size % rows or size % cols or size // rows != size // cols:
            raise ConfigError(f"maskdit: the {rows}x{cols} token grid does not tile the {size}x{size} input in square "
                              "patches, so the decoder's output layer cannot place its patches")
        self.patch_size = size // rows

        _to_buffers(backbone, head_only)  # the decoder replaces the head (module docstring)
        self.decoder_in = ModulatedLinear(token_width, width, cond_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width)) if self.mae_weight > 0 else None
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(width, rows, cols)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(width, heads, cond_width) for _ in range(self.decoder_depth))
        self.decoder_out = ModulatedLinear(width, self.patch_size ** 2 * backbone.in_channels, cond_width)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """The official init: xavier-uniform linears with zero bias, adaLN-Zero decoder blocks, zero input and
        output layers, mask token N(0, 0.02)."""
        for part in (self.decoder_in, self.decoder_blocks, self.decoder_out):
            part.apply(xavier_linear)
        for block in self.decoder_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        self.decoder_in.zero_init()
        self.decoder_out.zero_init()
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def training_rate(self) -> float:
        return self.mask_ratio

    def method_blocks(self) -> List[nn.Module]:
        return list(self.decoder_blocks)  # they see the full sequence: at B/2, 4 x 320 wide x 256 tokens

    #: a schedule may change the mask ratio (the paper's unmasked fine-tune: mask_ratio 0); the decoder, the mask
    #: token and the MAE weight stay (mae_weight decides whether the mask token exists: a parameter)
    schedulable = ("mask_ratio",)

    def apply_settings(self, **settings) -> None:
        self.refuse_unschedulable(settings)
        if "mask_ratio" in settings:
            self.mask_ratio = self.check_rate("mask_ratio", settings["mask_ratio"])

    def forward(self, x, noise_labels, class_labels, force_rate: Optional[float] = None,
                return_token_masks: bool = False, return_loss_terms: bool = False):
        tokens, cond, rate, grid, positions = self.begin_forward(x, noise_labels, class_labels, force_rate,
                                                                   return_token_masks)
        ids = None
        if rate > 0:
            ids, grid = self.draw(tokens.shape[0], rate, tokens.device)
            tokens, positions = gather_tokens(tokens, ids), ids
        for block in self.backbone.blocks:
            tokens = block(tokens, cond, grid, positions)
        out = self.decode(tokens, cond, ids)
        if not return_loss_terms:
            return out
        if ids is None:
            return out, None
        kept = self.kept_mask(ids)
        if self.mae_weight == 0:
            return out, LossTerms(token_weights=kept)
        return out, MaskedAutoencoderTerms(token_weights=kept, dropped=~kept, mae_weight=self.mae_weight)

    def decode(self, kept: torch.Tensor, cond: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        """The decoder: (B, kept, D) backbone output at positions ``ids`` (None: every position) -> output."""
        bb = self.backbone
        b, n = kept.shape[0], bb.num_tokens
        h = self.decoder_in(kept, cond)
        if ids is not None:
            token = self.mask_token if self.mask_token is not None else h.new_zeros(1, 1, h.shape[-1])
            h = scatter_tokens(token.expand(b, n, -1), ids, h)
        elif self.mask_token is not None and self.training:
            h = h + 0 * self.mask_token.sum()  # unused when nothing is masked: keep it in the graph (DDP)
        h = h + self.decoder_pos_embed
        positions = full_positions(b, n, h.device)
        for block in self.decoder_blocks:
            h = block(h, cond, bb.grid_size, positions)
        rows, cols = bb.grid_size
        return unpatchify(self.decoder_out(h, cond), rows, cols, self.patch_size, bb.in_channels)

    def describe(self) -> str:
        return (f"maskdit@{self.mask_ratio:g}, decoder {self.decoder_depth}x{self.decoder_width}, "
                f"mae {self.mae_weight:g}")

    def tokens_per_block(self, force_rate: Optional[float] = None) -> List[int]:
        rate = self.mask_ratio if force_rate is None else self.check_rate("force_rate", force_rate)
        return [self.kept_tokens(rate)] * self.backbone.depth


__all__ = ["MaskDiT", "MaskedAutoencoderTerms", "ModulatedLinear", "DecoderBlock", "patches"]
