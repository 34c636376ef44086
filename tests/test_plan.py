"""plan=true: parameters, FLOPs, GPU-hours and memory per GPU of every run, without training."""
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch

import tread_bench.engine
from diffusion import build_objective
from tread_bench.core.errors import ConfigError
from tread_bench.methods import build_network
from suite_helpers import compose_suite

ROOT = Path(__file__).resolve().parents[1]


def test_plan_of_dit_scaling_full_on_cpu_trains_nothing(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("IMAGENET_LATENTS", None)
    res = subprocess.run([sys.executable, "run_suite.py", "suite=dit_scaling", "scale=full", "plan=true", "plan_mfu=0.4",
                          f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "nothing trained" in res.stdout and "dit-XL2-tread-seed0" in res.stdout
    assert "MFU 0.4 for every run (plan_mfu" in res.stdout and "github.com/chuanyangjin/fast-DiT" in res.stdout
    assert not (tmp_path / "runs").exists()
    plan = pd.read_csv(tmp_path / "r" / "dit_scaling_full_plan.csv")
    assert (tmp_path / "r" / "dit_scaling_full_plan.md").exists()
    assert len(plan) == 8 and set(plan.method) == {"baseline", "tread"}
    xl = plan[(plan["size"] == "XL/2") & (plan.method == "baseline")].iloc[0]
    assert round(xl.params / 1e6) == 675
    assert xl.train_gflops_per_image == pytest.approx(3 * 118.6, rel=2e-3)  # DiT's 118.64 forward, x3 to train
    assert xl.total_train_flops == pytest.approx(400_000 * 256 * xl.train_gflops_per_image * 1e9)
    # by hand: 400K steps x 256 images x 355.9 GMACs x 2 FLOPs/MAC / (989 TFLOP/s x 0.4) = 51.2 H100-hours
    assert xl.gpu_hours_H100 == pytest.approx(400_000 * 256 * 355.9e9 * 2 / (989e12 * 0.4) / 3600, rel=2e-3)
    assert xl.gpu_hours_H100 == pytest.approx(51.2, abs=0.1)
    assert xl.gpu_hours_A100 == pytest.approx(xl.gpu_hours_H100 * 989 / 312)
    assert xl.mfu == 0.4 and xl.mfu_source == "given"
    assert xl.eval_gpu_hours_H100 == pytest.approx(2 * xl.total_eval_flops / (989e12 * 0.4) / 3600)
    assert xl.batch_per_gpu == 32 and xl.precision == "bf16"
    assert xl.mem_weights_gib + xl.mem_grads_gib + xl.mem_adamw_gib + xl.mem_ema_gib == pytest.approx(
        20 * xl.params / 2**30, rel=1e-6)
    tread = plan[(plan["size"] == "XL/2") & (plan.method == "tread")].iloc[0]
    assert tread.setting == "r(2->24)@0.5"
    assert tread.train_gflops_per_image == pytest.approx(3 * 69.17, rel=2e-3)  # the flops table's routed forward
    assert tread.mem_activations_gib < xl.mem_activations_gib  # routed blocks keep half the tokens


def test_plan_is_refused_for_a_suite_that_trains_nothing(tmp_path):
    cfg = compose_suite(["suite=flops", "plan=true", f"results_dir={tmp_path}/r"])
    with pytest.raises(ConfigError, match="plan=true plans suites that train"):
        tread_bench.engine.validate_suite(cfg)
    with pytest.raises(ConfigError, match="plan_mfu = 1.5: must be in"):
        tread_bench.engine.validate_suite(compose_suite(["suite=smoke", "plan=true", "plan_mfu=1.5"]))


def test_memory_counts_the_blocks_a_method_adds():
    """MaskDiT on the tiny DiT (6 blocks, width 64, 64 tokens) at mask 0.5 with a 2 x 32 decoder: by hand, the
    backbone's blocks see 32 tokens of width 64 and the decoder's blocks all 64 tokens at width 32."""
    from tread_bench.measure.memory import block_shapes, estimate_training_memory
    from tread_bench.methods import build_network

    with torch.device("meta"):
        net = build_network("dit", "tiny", (1, 32, 32), 10, "maskdit", mask_ratio=0.5, decoder_depth=2,
                            decoder_width=32, decoder_heads=4)
    assert block_shapes(net, (1, 32, 32), 10) == [(32, 64)] * 6 + [(64, 32)] * 2
    estimate = estimate_training_memory(net, (1, 32, 32), 10, 4, "fp32")
    assert estimate["token_width_per_image"] == 6 * 32 * 64 + 2 * 64 * 32
    assert estimate["activations"] == 4 * (6 * 32 * 64 + 2 * 64 * 32) * 140.0


MAX_MASKDIT = dict(kind="maskdit", method_args=dict(mask_ratio=0.5, decoder_depth=4, decoder_width=64, decoder_heads=4))


def edm_dit_xs4(method: dict):
    """(EDM, EDM-wrapped DiT-XS/4 on 32x32x1 with ``method``): a builder the memory probe's process can unpickle."""
    args = dict(method.get("method_args", {}), **{k: v for k, v in method.items() if k not in ("kind", "method_args")})
    objective = build_objective("edm")
    return objective, objective.wrap(build_network("dit", "XS/4", (1, 32, 32), 10, method.get("kind", "tread"), **args))


@pytest.mark.parametrize("method", [dict(routes=[]), dict(routes=[{"start": 2, "end": 8, "rate": 0.5}]), MAX_MASKDIT],
                         ids=["baseline", "tread", "maskdit"])
def test_memory_estimate_within_25_percent_of_a_measured_cpu_peak(method):
    """DiT-XS/4 at batch 64 on 32x32x1 (activations dominate), fp32 on CPU: estimate vs peak RSS growth of a fresh
    process running 2 steps with AdamW and an EMA copy. Measured here: -3% (baseline), +9% (TREAD); MaskDiT with a
    4 x 64 decoder (as many decoder as backbone activations per block): see the closing note."""
    from tread_bench.measure.memory import estimate_training_memory, measure_cpu_peak

    build = partial(edm_dit_xs4, method)
    with torch.device("meta"):
        _, model = build()
    estimate = estimate_training_memory(model.net, (1, 32, 32), 10, 64, "fp32")["total"] / 2**20
    measured = measure_cpu_peak(build, (1, 32, 32), 10, 64)["growth_mb"]
    assert estimate == pytest.approx(measured, rel=0.25), (estimate, measured)


# ------------------------------------------------------------------------------------------------------
# MFU from public throughput, and the evaluation's cost
# ------------------------------------------------------------------------------------------------------

XL_FWD = 118.6167e9  # DiT-XL/2's forward MACs at 256x256 (DiT's 118.64 "Gflops")


def vit_by_hand(depth, width, tokens=197):
    """ViT forward MACs: per block qkv + projection + 4x MLP (12 N D^2) and attention (2 N^2 D); 16x16x3 patches;
    the head."""
    return depth * (12 * tokens * width**2 + 2 * tokens**2 * width) + 196 * 768 * width + width * 1000


def sd_vae_decoder_by_hand():
    """SD-VAE's decoder on a 4x32x32 latent (3x3 convs unless noted; a resnet is two convs, plus a 1x1 shortcut
    when its channels change; up blocks of 3 resnets, the first three ending in a 2x upsample and a conv)."""
    conv = lambda hw, cin, cout, k=3: hw * hw * k * k * cin * cout  # noqa: E731
    mid = 4 * conv(32, 512, 512) + 4 * 1024 * 512**2 + 2 * 1024**2 * 512  # 2 resnets + attention (q, k, v, out)
    up0 = 6 * conv(32, 512, 512) + conv(64, 512, 512)
    up1 = 6 * conv(64, 512, 512) + conv(128, 512, 512)
    up2 = (conv(128, 512, 256) + conv(128, 256, 256) + conv(128, 512, 256, 1) + 4 * conv(128, 256, 256)
           + conv(256, 256, 256))
    up3 = conv(256, 256, 128) + conv(256, 128, 128) + conv(256, 256, 128, 1) + 4 * conv(256, 128, 128)
    return conv(32, 4, 512) + conv(32, 4, 4, 1) + mid + up0 + up1 + up2 + up3 + conv(256, 128, 3)


def test_mfu_from_public_throughput_by_hand():
    from tread_bench.measure.cost import mfu_for_width, reference_mfu, throughput_sources

    mfu = {r["model"]: r["mfu"] for r in throughput_sources()}
    # fast-DiT: 0.84 steps/s x 128 images on one A100 (312 TFLOP/s); 2 FLOPs per MAC, training = 3 forwards
    assert mfu["fast-DiT DiT-XL/2"] == pytest.approx(0.84 * 128 * 2 * 3 * XL_FWD / 312e12, rel=1e-4)
    assert mfu["fast-DiT DiT-XL/2"] == pytest.approx(0.2453, abs=1e-4)
    # LightningDiT: 80K steps x 1024 in 10 h on 8 H800 (989 TFLOP/s); its XL/1 on 16x16 tokens costs what XL/2 does
    assert mfu["LightningDiT-XL/1 (VA-VAE f16d32)"] == pytest.approx(80_000 * 1024 / 288_000 * 6 * XL_FWD / 989e12,
                                                                     rel=1e-3)
    assert mfu["Open-Sora DiT-XL/2"] == pytest.approx(1.3 * 128 * 6 * XL_FWD / 989e12, rel=1e-4)  # 0.1197
    assert mfu["MaskDiT-XL/2 (mask 0.5, decoder 8x512)"] == pytest.approx(0.3443, abs=1e-4)  # half the tokens
    # the median of the four mixed-precision figures: (0.2047 + 0.2453) / 2; the TF32 one is shown, not used
    assert reference_mfu() == pytest.approx(0.2250, abs=1e-4)
    assert mfu["DiT official train.py DiT-XL/2"] == pytest.approx(0.81 * 32 * 6 * XL_FWD / 312e12, rel=1e-4)
    # timm's ViTs on an RTX 3090 (71 TFLOP/s fp16, fp32 accumulate): the width factor
    small, base, large = (1052.92 * 6 * vit_by_hand(12, 384) / 71e12, 390.86 * 6 * vit_by_hand(12, 768) / 71e12,
                          117.08 * 6 * vit_by_hand(24, 1024) / 71e12)
    assert mfu["timm vit_small_patch16_224"] == pytest.approx(small, rel=1e-9)
    assert (small, base, large) == pytest.approx((0.4092, 0.5801, 0.6090), abs=1e-4)
    assert mfu_for_width(1152) == mfu_for_width(1024) == pytest.approx(0.2250, abs=1e-4)  # DiT-XL/2, L/2
    assert mfu_for_width(768) == pytest.approx(0.2250 * base / large, abs=1e-4)           # DiT-B/2: 0.214
    assert mfu_for_width(384) == pytest.approx(0.2250 * small / large, abs=1e-4)          # DiT-S/2: 0.151
    assert mfu_for_width(64) == mfu_for_width(384)  # held below the narrowest evidence


def test_evaluation_counts_by_hand():
    from tread_bench.measure.cost import evaluation_points, inception_macs, vae_decode_macs

    assert inception_macs() == pytest.approx(5.713e9, rel=1e-3)  # torchvision's InceptionV3: 5.71 GFLOPS
    assert vae_decode_macs((4, 32, 32)) == sd_vae_decoder_by_hand()  # 311.09 GMACs
    assert [evaluation_points(400_000, 50_000), evaluation_points(400_000, 0), evaluation_points(10, 3)] == [8, 1, 4]


def plan_of(tmp_path, *overrides):
    cfg = compose_suite(["suite=dit_scaling", "scale=full", "plan=true", "plan_mfu=null", f"results_dir={tmp_path}",
                         *overrides])
    assert tread_bench.engine.run_plan(cfg, tread_bench.engine.resolve_suite(cfg)) == 0  # plan_mfu=null: by width
    return pd.read_csv(tmp_path / "dit_scaling_full_plan.csv").set_index("run_id")


def test_plan_of_dit_scaling_takes_mfu_by_width_and_counts_the_evaluations(tmp_path, capsys):
    plan = plan_of(tmp_path)
    out = capsys.readouterr().out
    assert "MFU sources:" in out and "https://github.com/hustvl/LightningDiT" in out
    assert "median of the 'mfu' rows 0.225" in (tmp_path / "dit_scaling_full_plan.md").read_text()
    xl, s2 = plan.loc["dit-XL2-baseline"], plan.loc["dit-S2-baseline"]
    assert (xl.mfu, plan.loc["dit-L2-baseline"].mfu) == pytest.approx((0.2250, 0.2250), abs=1e-4)
    assert (plan.loc["dit-B2-baseline"].mfu, s2.mfu) == pytest.approx((0.2143, 0.1512), abs=1e-4)
    assert xl.mfu_source == "public throughput" and xl.width == 1152 and s2.width == 384
    # by hand: 400K steps x 256 images x 355.9 GMACs x 2 / (989 TFLOP/s x 0.2250) = 91.0 H100-hours (51.2 at 0.4)
    assert xl.gpu_hours_H100 == pytest.approx(400_000 * 256 * 3 * XL_FWD * 2 / (989e12 * 0.2250) / 3600, rel=1e-3)
    assert xl.gpu_hours_H100 == pytest.approx(91.0, abs=0.1)
    assert s2.gpu_hours_H100 == pytest.approx(400_000 * 256 * 18.162e9 * 2 / (989e12 * 0.1512) / 3600, rel=1e-3)
    # evaluation: every 50K steps and the last (8 points), FID-10K by EDM Heun 40 steps (79 evaluations), no CFG,
    # SD-VAE decode + Inception per sample; TREAD samples with the full network, as the baseline does
    assert (xl.eval_points, xl.fid_points, xl.sampler_nfe) == (8, 8, 79)
    assert xl.fid_sampling_flops_per_point == pytest.approx(10_000 * 79 * XL_FWD, rel=1e-5)  # 9.37e16
    assert xl.fid_decode_flops_per_point == 10_000 * sd_vae_decoder_by_hand()
    assert xl.fid_inception_flops_per_point == pytest.approx(10_000 * 5.713e9, rel=1e-3)
    per_point = 10_000 * (79 * XL_FWD + sd_vae_decoder_by_hand() + 5.713e9)
    assert xl.total_eval_flops == pytest.approx(8 * per_point, rel=1e-5)  # 7.75e17
    assert xl.eval_gpu_hours_H100 == pytest.approx(2 * 8 * per_point / (989e12 * 0.2250) / 3600, rel=1e-4)  # 1.94
    assert xl.total_gpu_hours_H100 == pytest.approx(xl.gpu_hours_H100 + xl.eval_gpu_hours_H100)
    tread = plan.loc["dit-XL2-tread"]
    assert tread.fid_sampling_flops_per_point == xl.fid_sampling_flops_per_point
    assert tread.gpu_hours_H100 == pytest.approx(xl.gpu_hours_H100 * 69.13 / 118.62, rel=1e-3)  # routed training


def test_cfg_doubles_the_sampling_and_fid_at_final_counts_one_point(tmp_path):
    plan = plan_of(tmp_path, "only=XL2-baseline", "++suite.eval.cfg_scale=1.5", "++suite.eval.fid_at=final",
                   "suite.eval.sampler_steps=20")
    xl = plan.loc["dit-XL2-baseline"]
    assert (xl.eval_points, xl.fid_points, xl.sampler_nfe) == (8, 1, 39)
    assert xl.fid_sampling_flops_per_point == pytest.approx(10_000 * 39 * 2 * XL_FWD, rel=1e-5)
    assert xl.total_eval_flops == pytest.approx(xl.eval_flops_per_point)  # nothing else at the other 7 points
