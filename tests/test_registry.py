"""A user's own backbone, registered in this file, gets routing and the suites with no other change."""
import pandas as pd
import pytest
import torch
from torch import nn

from backbones import BlockStack, build_backbone, list_backbones, register_backbone
from tread_bench.core.errors import ConfigError
from suite_helpers import run


class MixerBlock(nn.Module):
    """Token-mixing MLP over whatever tokens it is given (mean-pooled context), adaLN-style gate."""

    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.gate = nn.Linear(dim, dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x, cond, grid, positions):
        ctx = x.mean(dim=1, keepdim=True).expand_as(x)
        return x + self.gate(cond).unsqueeze(1) * self.mlp(torch.cat([x, ctx], dim=-1))


@register_backbone("test_mixer", sizes={"tiny": dict(depth=4, dim=32, patch=4)})
class TestMixer(BlockStack):
    def __init__(self, depth=4, dim=32, patch=4, input_size=32, in_channels=1, num_classes=10):
        super().__init__()
        self.input_size, self.in_channels, self.num_classes, self.patch = input_size, in_channels, num_classes, patch
        self.grid_size = (input_size // patch, input_size // patch)
        self.proj_in = nn.Linear(in_channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.02)
        self.t_embed = nn.Linear(1, dim)
        self.y_embed = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList(MixerBlock(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, in_channels * patch * patch)

    def embed(self, x, noise_labels, class_labels):
        b, c, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return self.proj_in(patches) + self.pos, self.t_embed(noise_labels[:, None]) + self.y_embed(class_labels)

    def head(self, tokens, cond):
        b, p, (gh, gw) = tokens.shape[0], self.patch, self.grid_size
        out = self.proj_out(tokens).reshape(b, gh, gw, self.in_channels, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(b, self.in_channels, gh * p, gw * p)


def test_registered_and_listed():
    assert "test_mixer" in list_backbones() and list_backbones()["test_mixer"] == ["tiny"]
    assert "dit" in list_backbones() and "XL/2" in list_backbones()["dit"]
    assert isinstance(build_backbone("test_mixer", "tiny"), TestMixer)


def test_unknown_backbone_and_size_list_the_choices():
    with pytest.raises(ConfigError, match="unknown backbone 'nope'.*dit"):
        build_backbone("nope")
    with pytest.raises(ConfigError, match="unknown size 'huge'.*S/2"):
        build_backbone("dit", "huge")


def test_user_backbone_trains_with_tread_through_the_suite(tmp_path):
    code = run(["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs",
                "suite.backbones=[{name:test_mixer,size:tiny}]", "suite.train.steps=12", "suite.data.name=synthetic",
                "suite.data.limit=64"])
    assert code == 0
    table = pd.read_csv(tmp_path / "results" / "smoke.csv")
    assert table.method.tolist() == ["baseline", "tread"]
    assert set(table.backbone) == {"test_mixer"} and set(table.status) == {"ok"}
    assert table.loc[table.method == "tread", "setting"].item() == "r(1->3)@0.5"
    assert (table.steps == 12).all() and table.final_loss.notna().all()


def test_a_size_the_scale_needs_and_the_backbone_lacks_is_one_error_naming_both(tmp_path):
    register_backbone("test_mixer_small", sizes={"small": dict(depth=4, dim=32, patch=4)})(TestMixer)
    with pytest.raises(ConfigError) as err:
        run(["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs",
             "suite.backbones=[{name:test_mixer_small,size:small}]"])
    assert str(err.value) == ("backbone 'test_mixer_small' has no size 'tiny', which scale=tiny gives every backbone; "
                              "add 'tiny' to its size table (@register_backbone(..., sizes=...)) or pick another "
                              "scale; its sizes: small")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


@register_backbone("test_no_null_label", sizes={"tiny": dict(depth=4, dim=32, patch=4)})
class NoNullLabel(TestMixer):
    """The mistake a plug-in author makes first: a class table of num_classes rows, none for the null label."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.y_embed = nn.Embedding(self.num_classes, self.y_embed.embedding_dim)


def test_a_backbone_without_the_unconditional_label_row_is_refused_before_anything_trains(tmp_path):
    with pytest.raises(ConfigError) as err:
        run(["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs",
             "suite.backbones=[{name:test_no_null_label,size:tiny}]", "suite.data.name=synthetic",
             "suite.data.limit=64"])
    message = str(err.value)
    assert message.startswith("backbone 'test_no_null_label' (test_registry) in run test_no_null_label-tiny-baseline"
                              "-seed0: its training forward on 2 CPU images with labels 0 and 4 (the unconditional "
                              "label) failed (IndexError: index out of range in self")
    assert message.endswith("; a class embedding needs num_classes + 1 rows: label dropout feeds the unconditional "
                            "label, index 4") and "\n" not in message
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
