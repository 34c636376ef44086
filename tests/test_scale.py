"""scale=auto: the ImageNet suites run at full scale when latents are configured, otherwise at the CPU
scale on Fashion-MNIST (config composition only, no training)."""
import pytest
import torch
from omegaconf import OmegaConf

import tread_bench.engine
from routing.routes import route_fields
from tread_bench.engine.schema import SUITES_DIR
from suite_helpers import compose_suite

IMAGENET_SUITES = ["arch_agnostic", "dit_scaling", "selection_rate", "route_ablation", "guidance"]


@pytest.fixture(autouse=True)
def no_latents(monkeypatch):
    monkeypatch.delenv("IMAGENET_LATENTS", raising=False)


@pytest.mark.parametrize("suite", IMAGENET_SUITES)
def test_without_latents_resolves_to_cpu_scale(suite, capsys):
    cfg = compose_suite([f"suite={suite}"])
    assert cfg.scale.name == "cpu" and cfg.suite.data.name == "fashion_mnist"
    assert "IMAGENET_LATENTS" in capsys.readouterr().out  # the one line that says how to get the full scale
    s = tread_bench.engine.resolve_suite(cfg)
    runs = tread_bench.engine.expand_runs(s, cfg.scale)
    assert runs and {r.size for r in runs} == {"XS/4"}
    for r in runs:  # the paper's 12-block routes apply unchanged at the CPU scale
        den = tread_bench.engine.validate_run(r, (1, 32, 32), 10)
        assert den.net.backbone.depth == 12


def test_cpu_study_protocol():
    """The headline study at CPU scale runs what suites/suite/arch_agnostic.yaml names: its four backbones, its two
    methods, 3 seeds; the selection-rate sweep is suite=selection_rate in the same protocol."""
    cfg = compose_suite(["suite=arch_agnostic"])
    s = tread_bench.engine.resolve_suite(cfg)
    assert list(s.seeds) == [0, 1, 2] and s.eval.loss_images > 0 and s.eval.samples > 0
    runs = tread_bench.engine.expand_runs(s, cfg.scale)
    written = OmegaConf.load(SUITES_DIR / "suite" / "arch_agnostic.yaml")
    assert {(r.backbone, r.method, r.seed) for r in runs} == {
        (b.name, m, seed) for b in written.backbones for m in written.methods for seed in (0, 1, 2)}
    assert {r.backbone for r in runs} == {"dit", "rwkv", "mamba", "lightningdit"}
    rates = {r.method: route_fields(r.args["routes"][0])[2] for r in runs if r.args.get("routes")}
    assert rates == {"tread": 0.5}

    cfg = compose_suite(["suite=selection_rate"])
    s = tread_bench.engine.resolve_suite(cfg)
    assert cfg.scale.name == "cpu" and list(s.seeds) == [0, 1, 2] and list(s.reuse_from) == ["arch_agnostic"]
    runs = tread_bench.engine.expand_runs(s, cfg.scale)
    rates = {r.method: route_fields(r.args["routes"][0])[2] for r in runs if r.args.get("routes")}
    assert rates == {"rate0.25": 0.25, "rate0.5": 0.5, "rate0.75": 0.75}
    assert {(r.backbone, r.size) for r in runs} == {("dit", "XS/4")}


@pytest.mark.parametrize("how", ["env", "override"])
def test_with_latents_resolves_to_full_scale(how, monkeypatch, tmp_path, capsys):
    if how == "env":
        monkeypatch.setenv("IMAGENET_LATENTS", str(tmp_path))
        cfg = compose_suite(["suite=arch_agnostic"])
    else:
        cfg = compose_suite(["suite=arch_agnostic", f"suite.data.kwargs.path={tmp_path}"])
    assert cfg.scale.name == "full" and cfg.suite.data.name == "latents"
    assert cfg.suite.data.kwargs.path == str(tmp_path)
    assert "scale: full" in capsys.readouterr().out
    with torch.device("meta"):
        runs = tread_bench.engine.expand_runs(tread_bench.engine.resolve_suite(cfg), cfg.scale)
    assert {r.size for r in runs} == {"B/2"}


def test_explicit_scales_and_other_suites_are_untouched():
    assert compose_suite(["suite=arch_agnostic", "scale=tiny"]).scale.name == "tiny"
    assert compose_suite(["suite=arch_agnostic", "scale=cpu"]).scale.name == "cpu"
    smoke = compose_suite(["suite=smoke"])
    assert smoke.scale.name == "full" and smoke.suite.data.name == "fashion_mnist"
