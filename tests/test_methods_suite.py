"""The `methods` suite (suites/suite/methods.yaml, suite_scale/methods_cpu.yaml, methods_tiny.yaml): it composes,
validates and builds every run at every scale, plans at full scale, says its fine-tune stages, and (slow) runs
end to end at scale=tiny (CI runs it through .ci/run)."""
import pandas as pd
import pytest
import torch

import tread_bench.engine
from tread_bench.measure.flops import torch_forward_macs
from tread_bench.methods import build_network
from suite_helpers import compose_suite, run

METHODS = ["baseline", "tread", "maskdit", "sprint", "drop"]
BACKBONES = ["dit", "rwkv", "mamba", "lightningdit"]


@pytest.mark.parametrize("scale", ["full", "cpu", "tiny", "auto"])
def test_the_methods_suite_builds_every_run_at_every_scale(scale, monkeypatch):
    monkeypatch.delenv("IMAGENET_LATENTS", raising=False)
    cfg = compose_suite(["suite=methods", f"scale={scale}"])
    tread_bench.engine.validate_suite(cfg)
    suite = tread_bench.engine.resolve_suite(cfg)
    runs = tread_bench.engine.expand_runs(suite, cfg.scale)
    shape, classes = ((4, 32, 32), 1000) if cfg.scale.name == "full" else ((1, 32, 32), 10)
    for r in runs:
        tread_bench.engine.validate_run(r, shape, classes)  # meta device: every stage of every schedule applied and checked
    pairs = {(r.backbone, r.method) for r in runs}
    if cfg.scale.name == "full":  # every backbone x every method at B/2, one seed, 400K steps
        assert pairs == {(b, m) for b in BACKBONES for m in METHODS} and {r.size for r in runs} == {"B/2"}
        stages = {r.method: r.schedule for r in runs if r.backbone == "dit"}
        assert stages["maskdit"] == [{"step": 384000, "mask_ratio": 0.0}]  # the last 4% unmasked
        assert stages["sprint"] == [{"step": 360000, "drop_ratio": 0.0}]  # the last 10% dense
        assert stages["tread"] == stages["drop"] == stages["baseline"] == []
    elif cfg.scale.name == "cpu":  # the CPU study: XS/4, 3 seeds, 1800 steps, fine-tunes at the same fractions
        assert pairs == {(b, m) for b in BACKBONES for m in METHODS} and {r.size for r in runs} == {"XS/4"}
        assert len(runs) == 60 and suite.train.steps == 1800 and suite.eval.every == 300
        assert suite.eval.fid_at == "final"
        stages = {r.method: r.schedule for r in runs}
        assert stages["maskdit"] == [{"step": 1728, "mask_ratio": 0.0}] and 1728 == 0.96 * 1800
        assert stages["sprint"] == [{"step": 1620, "drop_ratio": 0.0}] and 1620 == 0.9 * 1800
    else:  # CI: every method on every backbone's tiny size, 2 seeds
        assert pairs == {(b, m) for b in BACKBONES for m in METHODS} and len(runs) == 40


def forward_macs(size, shape=(4, 32, 32), classes=1000, kind="tread", **args):
    with torch.device("meta"):
        net = build_network("dit", size, shape, classes, kind, **args)
    macs = torch_forward_macs(net, shape, classes, routed=False)["macs"]
    return macs, sum(p.numel() for p in net.parameters())


def test_the_scaled_maskdit_decoders_cost_what_the_official_one_costs_on_xl():
    """The official 8 x 512 decoder adds 6.0% of the unmasked forward MACs and 8.2% of the parameters to DiT-XL/2;
    the YAML's rule (1/3 of the depth, 5/12 of the width in heads of 32) gives B/2 4 x 320, 10 heads: 6.5%, 8.9%."""
    cases = [("XL/2", dict(decoder_depth=8, decoder_width=512, decoder_heads=16), 0.060, 0.082),
             ("B/2", dict(decoder_depth=4, decoder_width=320, decoder_heads=10), 0.065, 0.089)]
    for size, decoder, flops_share, params_share in cases:
        base, base_params = forward_macs(size, routes=[])
        masked, params = forward_macs(size, kind="maskdit", **decoder)
        assert masked / base - 1 == pytest.approx(flops_share, abs=0.0005), size
        assert params / base_params - 1 == pytest.approx(params_share, abs=0.0005), size


@pytest.mark.parametrize("scale, size, decoder", [
    ("full", "B/2", (4, 320, 10)),   # 12 / 3 blocks; 768 * 5/12 = 320 = 10 heads of 32
    ("cpu", "XS/4", (4, 32, 1)),     # 64 * 5/12 = 26.7: one head of 32
    ("tiny", "tiny", (2, 32, 1))])   # 6 / 3 blocks
def test_the_maskdit_decoder_is_relative_to_the_backbone(scale, size, decoder, monkeypatch):
    monkeypatch.delenv("IMAGENET_LATENTS", raising=False)
    cfg = compose_suite(["suite=methods", f"scale={scale}"])
    suite = tread_bench.engine.resolve_suite(cfg)
    shape, classes = ((4, 32, 32), 1000) if scale == "full" else ((1, 32, 32), 10)
    run = next(r for r in tread_bench.engine.expand_runs(suite, cfg.scale) if r.run_id == f"dit-{size.replace('/', '')}-maskdit")
    net = tread_bench.engine.validate_run(run, shape, classes).net
    assert (net.decoder_depth, net.decoder_width, net.decoder_heads) == decoder
    assert len(net.decoder_blocks) == decoder[0] and net.decoder_blocks[0].attn.num_heads == decoder[2]


def test_plan_of_the_full_suite(tmp_path, capsys):
    cfg = compose_suite(["suite=methods", "scale=full", "plan=true", f"results_dir={tmp_path}", "only=dit-B2"])
    tread_bench.engine.validate_suite(cfg)
    assert tread_bench.engine.run_plan(cfg, tread_bench.engine.resolve_suite(cfg)) == 0
    plan = pd.read_csv(tmp_path / "methods_full_plan.csv").set_index("run_id")
    assert len(plan) == 10 and set(plan.backbone) == {"dit", "lightningdit"}  # `only` matches lightningdit-B2 too
    assert not (tmp_path / "runs").exists()
    dit = plan.loc[[f"dit-B2-{m}" for m in METHODS]]
    per_image = dict(zip(METHODS, dit.train_gflops_per_image))
    # cheaper than the baseline per image, drop-and-discard the cheapest; a staged run's mean lies between its stages
    assert per_image["drop"] < min(per_image["maskdit"], per_image["sprint"], per_image["tread"])
    assert max(per_image["maskdit"], per_image["sprint"], per_image["tread"]) < per_image["baseline"]
    assert ((dit.total_train_flops / (dit.train_gflops_per_image * 1e9 * 400000 * 256) - 1).abs() < 1e-12).all()


@pytest.mark.slow
def test_methods_tiny_end_to_end(tmp_path):
    """What CI runs (.ci/run): `python run_suite.py suite=methods scale=tiny`."""
    r = tmp_path / "r"
    assert run(["suite=methods", "scale=tiny", f"results_dir={r}", f"runs_dir={tmp_path}/runs", "tracker=none"]) == 0
    table = pd.read_csv(r / "methods_runs.csv")
    assert set(table.status) == {"ok"} and sorted(table.step.unique()) == [4, 8]
    final = table[table.step == 8]
    assert len(final) == 40 and final.fid.notna().all() and table.eval_loss.notna().all()
    routes = dict(zip(final.run_id, final.setting))
    assert routes["dit-tiny-maskdit"] == "maskdit@0.5, decoder 2x32, mae 0.1; from step 6: maskdit@0"
    assert routes["rwkv-tiny-sprint"] == "sprint(2->3)@0.75, path drop 0.1; from step 6: sprint(2->3)@0"
    selection = dict(zip(final.run_id, final.selection))
    assert selection["rwkv-tiny-sprint"] == "subgrid" and selection["rwkv-tiny-tread"] == "rows"
    assert selection["dit-tiny-sprint"] == "structured" and selection["dit-tiny-maskdit"] == "random"
    speed = pd.read_csv(r / "methods_speedup.csv")
    assert sorted(zip(speed.backbone, speed.method)) == sorted((b, m) for b in BACKBONES for m in METHODS[1:])
    assert (speed.flop_ratio > 1).all() and (speed.seeds == 2).all()
    for name in ("methods_speedup.md", "methods_tiny_dit-tiny.png", "methods_tiny_samples_rwkv-tiny.png"):
        assert (r / name).exists()


def test_flops_and_throughput_suites_take_every_method_kind(tmp_path):
    """suite=methods_flops counts every method (decoder and fusion included) against the hand count of
    test_token_methods and gives the FLOP ratio to the baseline; the throughput suite times every kind and predicts
    its speedup from the same forward counts (timings not checked: this is a loaded CI machine)."""
    from test_token_methods import tiny_macs

    r = tmp_path / "r"
    decoder = [f"suite.methods.{m}.decoder_depth=2" for m in ("maskdit", "maskdit_unmasked")]
    assert run(["suite=methods_flops", "scale=tiny", f"results_dir={r}", "suite.backbones=[{name:dit,size:tiny}]",
                "suite.data.channels=1", "suite.data.num_classes=10", *decoder]) == 0
    table = pd.read_csv(r / "methods_flops.csv").set_index("method")
    for method, kept in (("maskdit", 32), ("maskdit_unmasked", 64)):
        assert table.loc[method, "gflops_train"] * 1e9 == pytest.approx(3 * tiny_macs("maskdit", kept, True), rel=1e-12)
    base = table.loc["baseline", "gflops_train"]
    assert (table.flop_ratio_vs_baseline == base / table.gflops_train).all()
    assert table.loc["baseline", "flop_ratio_vs_baseline"] == 1
    assert table.loc["maskdit_unmasked", "flop_ratio_vs_baseline"] < 1  # the dense fine-tune costs more (decoder)
    assert table.loc["sprint", "params"] > table.loc["baseline", "params"] < table.loc["maskdit", "params"]

    assert run(["suite=throughput", "scale=tiny", f"results_dir={r}", "suite.backbones=[{name:dit,size:tiny}]",
                "+suite/common=methods", "+suite.methods.sprint={kind:sprint}", "suite.rounds=1", "suite.warmup=1",
                "suite.methods.maskdit.decoder_depth=2", "suite.methods.maskdit.decoder_width=32",
                "suite.methods.maskdit.decoder_heads=4"]) == 0
    speed = pd.read_csv(r / "throughput.csv").set_index("method")
    assert sorted(speed.index) == ["baseline", "drop", "maskdit", "sprint", "tread"] and speed.p50_ms.gt(0).all()
    # predicted = baseline / method forward MACs (torch counter: no norms); by hand for MaskDiT (the baseline's count
    # is test_token_methods' drop count with every token kept)
    baseline_macs = tiny_macs("drop", 64, False)
    assert speed.loc["maskdit", "predicted_speedup"] == pytest.approx(baseline_macs / tiny_macs("maskdit", 32, False),
                                                                      rel=1e-12)
