"""Token-reduction methods as plug-ins: the registry, a second method defined in this file running through
the suite's train kind, FLOP counting through the interface, and the random state a checkpoint saves."""
import math

import pandas as pd
import pytest
import torch

from backbones.protocol import full_positions
from diffusion import build_objective
from tread_bench.core.errors import ConfigError
from tread_bench.measure.flops import flops_table_row
from tread_bench.measure.throughput import make_train_step
from tread_bench.methods import Method, build_method, build_network, list_methods, register_method
from routing import gather_tokens, scatter_tokens
from suite_helpers import rng_state_replays, run


@register_method("test_stride")
class Strided(Method):
    """Blocks start..end see every ``stride``-th token while training (deterministic: no random state)."""

    selection = "strided"

    def __init__(self, backbone, start=1, end=2, stride=2):
        super().__init__()
        if not 0 <= start <= end < backbone.depth:
            raise ConfigError(f"test_stride: need 0 <= start <= end < {backbone.depth}")
        self.backbone, self.start, self.end, self.stride = backbone, start, end, stride

    def forward(self, x, noise_labels, class_labels, force_rate=None, return_token_masks=False):
        bb = self.backbone
        tokens, cond = bb.embed(x, noise_labels, class_labels)
        b, n = tokens.shape[:2]
        reduce = self.training or force_rate is not None
        ids = torch.arange(0, n, self.stride, device=tokens.device).expand(b, -1)
        full = full_positions(b, n, tokens.device)
        saved, masks = None, []
        for i, block in enumerate(bb.blocks):
            inside = reduce and self.start <= i <= self.end
            if inside and i == self.start:
                saved, tokens = tokens, gather_tokens(tokens, ids)
                if return_token_masks:
                    mask = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
                    masks.append(mask.scatter_(1, ids, True).view(b, *bb.grid_size))
            tokens = block(tokens, cond, None if inside else bb.grid_size, ids if inside else full)
            if inside and i == self.end:
                tokens = scatter_tokens(saved, ids, tokens)
        out = bb.head(tokens, cond)
        return (out, masks) if return_token_masks else out

    def describe(self):
        return f"stride{self.stride}({self.start}->{self.end})"

    def tokens_per_block(self, force_rate=None):
        n = self.backbone.num_tokens
        kept = len(range(0, n, self.stride))
        return [kept if self.start <= i <= self.end else n for i in range(self.backbone.depth)]


def test_registry_lists_kinds_and_refuses_unknown_ones():
    assert {"tread", "test_stride"} <= set(list_methods())
    bb = build_network("dit", "tiny", (1, 32, 32), 10).backbone
    with pytest.raises(ConfigError, match="unknown method kind 'nope'; registered kinds: .*tread"):
        build_method("nope", bb)
    with pytest.raises(ConfigError, match="method kind 'test_stride' rejected its arguments"):
        build_method("test_stride", bb, routes=[])
    with pytest.raises(ConfigError, match="already registered"):
        register_method("tread")(Strided)


def test_second_method_trains_through_the_suite(tmp_path):
    assert run(["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs",
                "suite.train.steps=4", "suite.data.limit=64", "~suite.methods.tread",
                "+suite.methods.strided={kind:test_stride,start:1,end:3,stride:2}",
                "+suite.methods.tread2={kind:tread,routes:[{start:1,end:3,rate:0.5}],selection:random}"]) == 0
    table = pd.read_csv(tmp_path / "r" / "smoke.csv").set_index("method")
    assert list(table.index) == ["baseline", "strided", "tread2"] and set(table.status) == {"ok"}
    assert table.loc["strided", "setting"] == "stride2(1->3)" and table.loc["strided", "selection"] == "strided"
    assert table.loc["tread2", "setting"] == "r(1->3)@0.5" and table.loc["tread2", "selection"] == "random"
    speed = pd.read_csv(tmp_path / "r" / "smoke_speedup.csv").set_index("method")
    assert speed.loc["strided", "flop_ratio"] > 1  # counted from what its blocks received


def test_unknown_kind_in_a_suite_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="unknown method kind 'nope'"):
        run(["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs",
             "+suite.methods.other={kind:nope}"])
    assert not (tmp_path / "runs").exists()


def test_flops_and_throughput_go_through_the_interface():
    data = dict(input_size=32, in_channels=1, num_classes=10)
    row = flops_table_row("dit", "tiny", kind="test_stride", start=1, end=3, stride=2, **data)
    assert row["tokens_per_block"] == "1x64,3x32,2x64" and row["ratio"] > 1 and row["setting"] == "stride2(1->3)"
    tread = flops_table_row("dit", "tiny", routes=[{"start": 1, "end": 3, "rate": 0.5}], **data)
    assert tread["tokens_per_block"] == row["tokens_per_block"] and tread["gflops_fwd_routed"] == row["gflops_fwd_routed"]
    Strided.tokens_per_block = lambda self, force_rate=None: [64] * 6
    try:
        with pytest.raises(RuntimeError, match="declares tokens per block"):
            flops_table_row("dit", "tiny", kind="test_stride", **data)
    finally:
        del Strided.tokens_per_block
    objective = build_objective("flow")
    model = objective.wrap(build_network("dit", "tiny", (1, 32, 32), 10, "test_stride", start=1, end=3))
    assert math.isfinite(make_train_step(objective, model, (1, 32, 32), 10, 2, "cpu", "fp32")())


def test_rng_state_restores_the_same_routing():
    torch.manual_seed(0)
    net = build_network("dit", "tiny", (1, 32, 32), 10, routes=[{"start": 1, "end": 3, "rate": 0.5}], seed=3).train()
    x, t, y = torch.randn(2, 1, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long)
    rng_state_replays(net, x, t, y)
    assert net.describe() == "r(1->3)@0.5" and net.tokens_per_block() == [64, 32, 32, 32, 64, 64]


def test_shard_slices_the_global_draw():
    routes = [{"start": 1, "end": 3, "rate": 0.5}]
    whole = build_network("dit", "tiny", (1, 32, 32), 10, routes=routes, seed=1).train()
    half = build_network("dit", "tiny", (1, 32, 32), 10, routes=routes, seed=1).train()
    half.load_state_dict(whole.state_dict())
    half.set_shard(1, 2)
    x, t, y = torch.randn(4, 1, 32, 32), torch.zeros(4), torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        _, (mask_all,) = whole(x, t, y, return_token_masks=True)
        _, (mask_half,) = half(x[2:], t[2:], y[2:], return_token_masks=True)
    assert torch.equal(mask_all[2:], mask_half)  # rank 1 of 2 gets the second half of the global draw


@register_method("test_rounding")
class Rounding(Strided):
    """The second mistake: a token count computed with round() on a size read off a tensor, which the FLOP
    counter's trace turns into a traced value."""

    def forward(self, x, noise_labels, class_labels, force_rate=None, return_token_masks=False):
        tokens, _ = self.backbone.embed(x, noise_labels, class_labels)
        self.stride = max(1, round(tokens.shape[1] / 32))
        return super().forward(x, noise_labels, class_labels, force_rate, return_token_masks)


def test_a_method_that_rounds_a_traced_size_is_refused_before_anything_trains(tmp_path):
    with pytest.raises(ConfigError) as err:
        run(["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs",
             "+suite.methods.rounding={kind:test_rounding,start:1,end:3}"])
    message = str(err.value)
    assert message.startswith("method 'test_rounding' (test_methods) in run dit-tiny-rounding-seed0: counting its "
                              "FLOPs (tread_bench.measure.flops traces forward with fvcore) failed (TypeError: ")
    assert message.endswith("make each token count a plain int with int(...)") and "\n" not in message
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
