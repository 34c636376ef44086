"""scale=dryrun (tread_bench/engine/dryrun.py) and bf16 autocast on CPU: the block after each route end runs in fp32, the loss is
fp32."""
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import tread_bench.engine
from tread_bench.core.errors import ConfigError
from suite_helpers import compose_suite

ROOT = Path(__file__).resolve().parents[1]
PAPER_SUITES = ("dit_scaling", "arch_agnostic", "selection_rate", "route_ablation", "guidance")


# ------------------------------------------------------------------------------------------- bf16 autocast on CPU
def _record_dtypes(net):
    """Per block: autocast state and dtypes at its entry, and the output dtype of every nn.Linear inside it (the
    dtype a matmul ran in: bf16 under autocast, fp32 with autocast off)."""
    seen = {i: {"linear": []} for i in range(len(net.blocks))}
    handles = []
    for i, block in enumerate(net.blocks):
        def pre(module, args, i=i):
            seen[i].update(autocast=torch.is_autocast_enabled("cpu"), tokens=args[0].dtype, cond=args[1].dtype)

        def post(module, args, out, i=i):
            seen[i]["out"] = out.dtype

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
        for layer in block.modules():
            if isinstance(layer, nn.Linear):
                handles.append(layer.register_forward_hook(lambda m, a, out, i=i: seen[i]["linear"].append(out.dtype)))
    return seen, handles


# routes r(0->1) and r(3->3) on the 6 blocks of tiny DiT: blocks 2 and 4 follow a route end, 0, 1, 3 and 5 do not
ROUTES = [{"start": 0, "end": 1, "rate": 0.5}, {"start": 3, "end": 3, "rate": 0.5}]
AFTER_END, ELSEWHERE = (2, 4), (0, 1, 3, 5)


@pytest.mark.parametrize("objective", ["edm", "flow"])
@pytest.mark.parametrize("fp32_after_route", [True, False])
def test_bf16_autocast_runs_the_block_after_each_route_end_in_fp32_and_the_loss_in_fp32(objective, fp32_after_route):
    from tread_bench.methods import build_network
    from diffusion import build_objective

    torch.manual_seed(0)
    net = build_network("dit", "tiny", (4, 32, 32), 10, "tread", seed=0, fp32_after_route=fp32_after_route,
                        routes=ROUTES, selection="random")
    obj = build_objective(objective)
    model = obj.wrap(net).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 4, 32, 32, generator=g), torch.randint(10, (3,), generator=g)
    draws = obj.draw(3, (4, 32, 32), g)
    seen, handles = _record_dtypes(net)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            per_sample = obj.loss(model, x, y, draws)
    finally:
        for h in handles:
            h.remove()
    assert per_sample.dtype == torch.float32 and per_sample.shape == (3,)
    per_sample.mean().backward()  # the fp32 loss backpropagates through both precisions
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.blocks.parameters())
    for i in ELSEWHERE:  # autocast on: every matmul of the block in bf16
        assert seen[i]["autocast"] and set(seen[i]["linear"]) == {torch.bfloat16}, (i, seen[i])
    for i in AFTER_END:
        if fp32_after_route:  # autocast off; inputs, every matmul and the output in fp32
            assert not seen[i]["autocast"], (i, seen[i])
            assert seen[i]["tokens"] == seen[i]["cond"] == seen[i]["out"] == torch.float32
            assert len(seen[i]["linear"]) >= 4 and set(seen[i]["linear"]) == {torch.float32}, (i, seen[i])
        else:  # the control: without the flag these blocks run in bf16 like the others, and the hooks see it
            assert seen[i]["autocast"] and set(seen[i]["linear"]) == {torch.bfloat16}, (i, seen[i])


def test_bf16_training_step_of_the_trainer_on_cpu(tmp_path, fresh_accelerator_state):
    """The trainer's own step under precision=bf16 on CPU (accelerate's autocast): the block after each route end
    runs in fp32, the others in bf16, and the loss that is backpropagated is fp32."""
    from tread_bench.data import load_dataset
    from tread_bench.training.trainer import Trainer, TrainConfig
    from suite_helpers import build_denoiser

    data = load_dataset("synthetic", 32, limit=16, channels=4, num_classes=10)
    den = build_denoiser("dit", "tiny", data.shape, data.num_classes, routes=ROUTES)
    trainer = Trainer(den, data, TrainConfig(steps=1, global_batch=4, precision="bf16", loader_workers=0),
                      tmp_path / "run")
    seen, handles = _record_dtypes(den.net)
    losses, original = [], trainer.objective.loss

    def recorded_loss(*args, **kwargs):  # the per-sample loss train_step averages and backpropagates
        losses.append(original(*args, **kwargs))
        return losses[-1]

    trainer.objective.loss = recorded_loss
    try:
        value = trainer.train_step()
    finally:
        for h in handles:
            h.remove()
    assert math.isfinite(value) and losses[0].dtype == torch.float32 and losses[0].shape == (4,)
    assert all(set(seen[i]["linear"]) == {torch.float32} and not seen[i]["autocast"] for i in AFTER_END)
    assert all(set(seen[i]["linear"]) == {torch.bfloat16} and seen[i]["autocast"] for i in ELSEWHERE)


# ---------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("suite", PAPER_SUITES)
def test_dryrun_scale_keeps_the_full_size_runs_on_synthetic_latents_of_the_real_shape(suite):
    full = compose_suite([f"suite={suite}", "scale=full"])
    dry = compose_suite([f"suite={suite}", "scale=dryrun"])
    tread_bench.engine.validate_suite(dry)
    s = tread_bench.engine.resolve_suite(dry)
    full_runs = tread_bench.engine.expand_runs(tread_bench.engine.resolve_suite(full), full.scale)
    dry_runs = tread_bench.engine.expand_runs(s, dry.scale)
    # every run of the full suite, with its backbone size and routes (the full-size models are the point)
    assert [(r.run_id, r.size, r.args) for r in dry_runs] == [(r.run_id, r.size, r.args) for r in full_runs]
    assert s.dryrun and s.data.name == "synthetic" and s.data.resolution == 32
    assert dict(s.data.kwargs) == {"num": 64, "channels": 4, "num_classes": 1000}  # no latent path left over
    assert s.train.steps == 2 and s.train.global_batch == 2
    assert 0 < s.eval.samples <= 8 and 0 < s.eval.loss_images <= 8 and s.eval.vae == "random-sd-vae"
    from tread_bench.data import load_dataset

    data = load_dataset(s.data.name, s.data.resolution, **s.data.kwargs)
    assert data.shape == (4, 32, 32) and data.num_classes == 1000


def test_dryrun_scale_is_refused_for_a_suite_without_a_dryrun_file():
    with pytest.raises(ConfigError, match="scale=dryrun runs the paper suites .* suite smoke has no "
                                          "suites/suite_scale/smoke_dryrun.yaml"):
        tread_bench.engine.validate_suite(compose_suite(["suite=smoke", "scale=dryrun"]))


# --------------------------------------------------------------------------------------------- fresh processes
def _killed_by_the_kernel():
    os.kill(os.getpid(), signal.SIGKILL)


def _peak_after_allocating(mib):
    from tread_bench.measure.memory import peak_rss_mib, rss_mib

    before = rss_mib()
    block = torch.ones(mib * 2**18)  # mib MiB of float32, touched
    return before, peak_rss_mib(), float(block[-1])


def test_a_run_process_killed_by_the_kernel_is_one_failure_line():
    from tread_bench.core.processes import run_in_fresh_process

    with pytest.raises(RuntimeError, match=r"killed by signal SIGKILL \(SIGKILL: most likely the kernel's "
                                           r"out-of-memory killer\) before reporting a result"):
        run_in_fresh_process(_killed_by_the_kernel)


def test_a_fresh_process_reports_its_own_peak():
    """The child's peak includes the 300 MiB tensor it allocated; the parent's 400 MiB are not in it."""
    from tread_bench.core.processes import run_in_fresh_process

    ballast = torch.ones(400 * 2**18)  # 400 MiB in this process: a fresh child must not count it
    before, peak, last = run_in_fresh_process(_peak_after_allocating, 300)
    assert last == 1.0 and peak - before >= 295
    assert peak < before + 300 + 100 and float(ballast[0]) == 1.0


# ------------------------------------------------------------------------------------------- full-size dry run
@pytest.mark.slow
def test_dryrun_of_a_paper_suite_at_full_size(tmp_path):
    """`python run_suite.py suite=selection_rate scale=dryrun only=rate0.5`: DiT-B/2 with TREAD r(2->8)@0.5, 2 steps on
    4x32x32 synthetic latents, held-out loss and FID on a handful of samples, in a fresh process; its row in
    results/dryrun.csv. About 3-4 minutes on 2 cores."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TREAD_FID_CACHE": str(tmp_path / "fid")}
    res = subprocess.run([sys.executable, "run_suite.py", "suite=selection_rate", "scale=dryrun", "only=rate0.5",
                          f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/runs", "tracker=none"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    table = pd.read_csv(tmp_path / "r" / "dryrun.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert (row.suite, row.run, row.setting, row.status) == ("selection_rate", "dit-B2-rate0.5-seed0", "r(2->8)@0.5", "ok")
    assert round(row.params / 1e6) == 130  # DiT-B/2 (Peebles & Xie 2023, Table 1: 130M)
    assert (row.steps, row.batch, row.precision) == (2, 2, "fp32")
    # weights, gradients, AdamW's two moments and the EMA copy (20 bytes/parameter) must have been resident at once
    state_mib = 20 * row.params / 2**20
    assert row.train_peak_rss_mib - row.base_rss_mib >= state_mib
    assert row.peak_rss_mib >= row.train_peak_rss_mib
    assert abs(row.plan_error_pct) < 25  # plan=true's estimate against the measured training growth
    assert row.plan_error_pct == pytest.approx(100 * (row.plan_mib / row.train_growth_mib - 1))
    assert math.isfinite(row.eval_loss) and math.isfinite(row.fid) and row.fid_samples == 4
    assert row.run_wall_s > row.train_wall_s > 0
    run_dir = tmp_path / "runs" / "selection_rate" / "dryrun" / "dit-B2-rate0.5-seed0"
    assert (run_dir / "result.json").exists() and not (run_dir / "checkpoint").exists()  # written, then deleted
    assert "dit-B2-rate0.5-seed0" in (tmp_path / "r" / "dryrun.md").read_text()
    runs = pd.read_csv(tmp_path / "r" / "selection_rate_runs.csv")
    assert list(runs.scale) == ["dryrun"] and list(runs.step) == [2]
