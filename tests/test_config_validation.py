"""Bad configuration is refused before anything is written: one `error:` line naming the key and the fix, exit
code 2, no run folder and no results folder. Every shipped suite validates at every scale."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import tread_bench.engine
from tread_bench.core.errors import ConfigError
from suite_helpers import compose_suite, run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SUITES = ["smoke", "flops", "throughput", "arch_agnostic", "dit_scaling", "selection_rate", "route_ablation", "guidance",
          "methods", "methods_flops", "methods_throughput", "crossover", "crossover_batch", "crossover_long"]
HOW = 'write it as {start: 2, end: 8, rate: 0.5} or "2->8@0.5"'

# (override of `suite=smoke scale=tiny`, the exact message after "error: ")
BAD = [
    ('suite.methods.tread.routes=["2to8"]', f"suite.methods.tread: route '2to8': {HOW}"),
    ('suite.methods.tread.routes=["1->3"]', f"suite.methods.tread: route '1->3': no rate; {HOW}"),
    ('suite.methods.tread.routes=["1->3@half"]',
     f"suite.methods.tread: route '1->3@half': rate 'half' is not a number; {HOW}"),
    ("suite.methods.tread.routes=[{start:1,end:3,rate:half}]",
     f"suite.methods.tread: route {{start: 1, end: 3, rate: half}}: rate 'half' is not a number; {HOW}"),
    ('suite.methods.tread.routes="1->3@0.5"', 'suite.methods.tread: routes must be a list of routes, got 1->3@0.5; '
     'e.g. routes: ["2->8@0.5"]'),
    ("+suite.methods.tread.rotues=[]", "unknown key 'suite.methods.tread.rotues' for a method of kind tread; did you "
     "mean 'routes'? its keys are: kind, backbones, routes, selection, schedule"),
    ("suite.train.steps=0", "suite.train.steps = 0: must be > 0 (training steps) and at most 10^9; e.g. suite.train.steps=1000"),
    ("suite.train.steps=abc", "suite.train.steps: Value 'abc' of type 'str' could not be converted to Integer; "
     "e.g. suite.train.steps=1000"),
    ("suite.train.global_batch=0", "suite.train.global_batch = 0: must be > 0 (images per step, all processes "
     "together); e.g. suite.train.global_batch=256"),
    ("suite.train.lr=-1", "suite.train.lr = -1: must be > 0 and <= 1 (AdamW learning rate); e.g. suite.train.lr=0.0001"),
    ('suite.train.lr="0.001"', "suite.train.lr = '0.001' is a str; write it as 0.001"),
    ("suite.train.lr=inf", "suite.train.lr = inf: must be a finite number; e.g. suite.train.lr=0.0001"),
    ("suite.train.lr=nan", "suite.train.lr = nan: must be a finite number; e.g. suite.train.lr=0.0001"),
    ("suite.train.lr=2.0", "suite.train.lr = 2.0: must be > 0 and <= 1 (AdamW learning rate); e.g. suite.train.lr=0.0001"),
    ("+suite.train.grad_clip=-inf", "suite.train.grad_clip = -inf: must be a finite number; set suite.train.grad_clip"),
    ("suite.train.steps=1000000000000", "suite.train.steps = 1000000000000: must be > 0 (training steps) and at most "
     "10^9; 1,000,000,000,000 steps would take 32 years even at 1 ms a step; e.g. suite.train.steps=1000"),
    ("suite.train.ema_decay=1.0", "suite.train.ema_decay = 1.0: must be in [0, 1); e.g. suite.train.ema_decay=0.9999"),
    ("+suite.train.stepz=3", "unknown key 'suite.train.stepz'; did you mean 'steps'? the keys of suite.train are: "
     "steps, global_batch, lr, betas, weight_decay, ema_decay, label_dropout, precision, tf32, route_aware_loss, "
     "fp32_after_route, grad_clip, checkpoint_every, log_every, warmup_steps_excluded, compile, compile_blocks, "
     "fault_nan_at_step"),
    ("+suite.train.seed=3", "suite.train.seed is not read from the suite: set the seed with suite.seed=<s> or "
     "suite.seeds=[...]"),
    ("+suite.eval.sample=8", "unknown key 'suite.eval.sample'; did you mean 'samples'?"),
    ("suite.eval.every=-1", "suite.eval.every = -1: must be >= 0 (0: only the final step); e.g. suite.eval.every=0"),
    ("+suite.seeds=[0,0]", "suite.seeds = [0, 0]: must be a non-empty list of distinct integers, e.g. [0, 1, 2]"),
    ("+suite.jobs=0", "suite.jobs = 0: must be >= 1 (runs trained at a time); e.g. suite.jobs=1"),
    ("+suite.batch=8", "suite.batch is read by throughput suites only, and this suite's kind is train; remove it"),
    ("suite.backbones=[{name:dit,sise:tiny}]", "unknown key 'suite.backbones[0].sise'; did you mean 'size'? the keys "
     "of suite.backbones[0] are: name, size, selection, overrides"),
    ("device=gpu", "device = gpu: must be auto, cpu or cuda"),
]
NOT_DIVISIBLE = ("input size 30 is not divisible by the patch size 4: set the data resolution (suite.data.resolution) "
                 "to a multiple of 4, or pick a backbone size whose patch size divides 30")


def dirs(tmp):
    return [f"results_dir={tmp}/results", f"runs_dir={tmp}/runs"]


def nothing_written(tmp):
    return not (Path(tmp) / "runs").exists() and not (Path(tmp) / "results").exists()


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        run(["suite=smoke", "scale=tiny", *dirs(tmp_path), override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert nothing_written(tmp_path)


def test_input_size_not_divisible_by_the_patch(tmp_path):
    with pytest.raises(ConfigError) as err:
        run(["suite=smoke", "scale=tiny", *dirs(tmp_path), "suite.data.resolution=30"])
    assert str(err.value) == NOT_DIVISIBLE
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("override, message", [BAD[0], BAD[6], BAD[12], ("suite.data.resolution=30", NOT_DIVISIBLE)],
                         ids=["route", "steps", "unknown-key", "patch"])
def test_run_suite_prints_one_error_line_and_exits_2(tmp_path, override, message):
    res = subprocess.run([sys.executable, "run_suite.py", "suite=smoke", "scale=tiny", *dirs(tmp_path), override],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert "Traceback" not in res.stderr
    assert nothing_written(tmp_path)


# Mistakes Hydra would report in several lines (exit 1) before our checks run: checked ahead of Hydra
COMMAND_LINE = [
    ("suite.train.stepz=5", "unknown key 'suite.train.stepz'; did you mean 'steps'? the keys of suite.train are: "),
    ("suite=smok", "unknown suite 'smok'; did you mean 'smoke'? choose one of arch_agnostic, crossover, crossover_batch, crossover_long, dit_scaling, flops, "
     "guidance, methods, methods_flops, methods_throughput, route_ablation, selection_rate, smoke, throughput"),
    ("objective=flo", "unknown objective 'flo'; did you mean 'flow'? choose one of edm, flow"),
    ("+stepz=1", "unknown top-level key 'stepz'"),
    ("suite.methods.tread.routes=[2->20@0.5]", "cannot read the override suite.methods.tread.routes=[2->20@0.5] "
     "(Hydra's override grammar); quote the value, with the whole argument in double quotes for the shell: "
     "\"suite.methods.tread.routes=['2->20@0.5']\""),
    ("suite.data.kwargs.root=/tmp/données", "cannot read the override suite.data.kwargs.root=/tmp/données (Hydra's "
     "override grammar); quote the value, with the whole argument in double quotes for the shell: "
     "\"suite.data.kwargs.root='/tmp/données'\""),
]


@pytest.mark.parametrize("override, message", COMMAND_LINE, ids=[c[0] for c in COMMAND_LINE])
def test_hydra_composition_mistakes_get_one_line_and_exit_2(tmp_path, override, message):
    res = subprocess.run([sys.executable, "run_suite.py", "suite=smoke", "scale=tiny", *dirs(tmp_path), override],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if "Warning" not in line and "warn" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), res.stderr
    assert nothing_written(tmp_path)


def test_an_unknown_key_written_without_plus_names_the_plus_form():
    from tread_bench.engine.schema import check_command_line

    problem = check_command_line(["suite=smoke", "scale=tiny", "suite.train.stepz=5"], str(ROOT / "suites"))
    assert problem.endswith("(to add a key the config does not have, write +suite.train.stepz=5)")
    assert check_command_line(["suite=smoke", "scale=tiny", "suite.train.steps=5"], str(ROOT / "suites")) is None
    assert check_command_line(["-m", "suite=smoke", "suite.seed=0,1"], str(ROOT / "suites")) is None  # Hydra's


@pytest.mark.parametrize("routes", ['["1->3@0.5"]', '["r(1->3)@0.5"]', '["1->-3@0.5"]'])
def test_routes_in_the_papers_notation(routes):
    cfg = compose_suite(["suite=smoke", "scale=tiny", f"suite.methods.tread.routes={routes}"])
    tread_bench.engine.validate_suite(cfg)
    (run_,) = [r for r in tread_bench.engine.expand_runs(tread_bench.engine.resolve_suite(cfg), cfg.scale) if r.method == "tread"]
    tread_bench.engine.validate_run(run_, (1, 32, 32), 10)
    assert run_.setting == "r(1->3)@0.5"  # depth 6: end -3 is block 3


@pytest.mark.parametrize("scale", ["full", "cpu", "tiny", "auto"])
@pytest.mark.parametrize("suite", SUITES)
def test_every_suite_validates_at_every_scale(suite, scale, monkeypatch):
    monkeypatch.delenv("IMAGENET_LATENTS", raising=False)
    typed = tread_bench.engine.validate_suite(compose_suite([f"suite={suite}", f"scale={scale}"]))
    assert typed["suite"].name == suite


def test_a_suite_whose_runs_all_fail_writes_its_table_and_exits_1(tmp_path, capsys):
    args = ["suite=smoke", "scale=tiny", *dirs(tmp_path), "suite.train.steps=2", "suite.data.limit=64"]
    assert run(args) == 0  # a table exists already: the failed rows are upserted into it
    for _ in range(2):  # twice: a rerun replaces its failed rows
        assert run(args + ["+suite.train.fault_nan_at_step=1"]) == 1
        assert "2 of 2 runs failed" in capsys.readouterr().err
    table = pd.read_csv(tmp_path / "results" / "smoke.csv")
    failed = table[table.status == "failed"]
    assert failed.method.tolist() == ["baseline", "tread"]
    assert failed.error.str.contains("loss became nan at step 1").all()


def test_guidance_resumes_only_a_checkpoint_of_its_configuration(tmp_path, monkeypatch):
    """The guidance kind trains through the train kind's lifecycle: a checkpoint of another configuration is deleted
    with the run's sampled modes, a matching one is kept; the sampling modes are not part of the configuration."""
    import tread_bench.engine.lifecycle as lifecycle
    import tread_bench.kinds.guidance as guidance

    run_dir = tmp_path / "runs" / "guidance" / "tiny" / "dit-tiny-tread-seed0"
    run_dir.mkdir(parents=True)
    seen = []

    def train_one(run, suite, data, run_dir, device, snapshot, tracker="none", memory=None):  # stops where training would start
        seen.append(((run_dir / "checkpoint.pt").exists(), (run_dir / "sampling" / "cfg_low.json").exists()))
        raise KeyboardInterrupt

    monkeypatch.setattr(lifecycle, "train_one", train_one)
    for hash_written, extra in (("another configuration", []), (None, ["+suite.sampling.cfg_mid={cfg_scale:2.0}"])):
        cfg = compose_suite(["suite=guidance", "scale=tiny", "only=tread-", *dirs(tmp_path), *extra])
        suite = tread_bench.engine.resolve_suite(cfg)
        (run_dir / "checkpoint.pt").write_text("weights")
        (run_dir / "sampling").mkdir(exist_ok=True)
        (run_dir / "sampling" / "cfg_low.json").write_text("{}")
        if hash_written:
            (run_dir / "config_hash").write_text(hash_written)
        with pytest.raises(KeyboardInterrupt):
            guidance.run_guidance_suite(cfg, suite)
    # the stale checkpoint and modes were deleted; the matching ones kept, though a mode was added
    assert seen == [(False, False), (True, True)]


def test_mamba_A_log_and_D_are_not_decayed(tmp_path):
    from tread_bench.data import load_dataset
    from tread_bench.training.trainer import Trainer, TrainConfig
    from suite_helpers import build_denoiser

    data = load_dataset("synthetic", 32, limit=8)
    den = build_denoiser("mamba", "tiny", data.shape, data.num_classes)
    trainer = Trainer(den, data, TrainConfig(weight_decay=0.05, global_batch=2), tmp_path)
    decayed, undecayed = trainer.opt.param_groups
    names = {id(p): n for n, p in den.named_parameters()}
    flagged = {n.rsplit(".", 1)[-1] for n in map(names.get, map(id, undecayed["params"]))}
    assert undecayed["weight_decay"] == 0 and decayed["weight_decay"] == 0.05 and flagged == {"A_log", "D"}
    assert len(undecayed["params"]) == 2 * 2 * 6  # A_log and D of two mixers in each of 6 blocks
    plain = Trainer(build_denoiser("mamba", "tiny", data.shape, data.num_classes), data, TrainConfig(global_batch=2),
                    tmp_path)
    assert len(plain.opt.param_groups) == 1  # no weight decay: one group, as checkpoints written before have



def test_output_folders_that_cannot_be_folders_are_refused_before_anything_is_written(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    base = ["suite=smoke", "scale=tiny", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]
    cases = [(f"results_dir={a_file}", f"results_dir={a_file} is a file, not a folder; give results_dir a folder path"),
             (f"runs_dir={a_file}/runs", f"runs_dir={a_file}/runs is under {a_file}, which is a file, not a folder; "
                                         "give runs_dir a folder path")]
    for override, message in cases:
        with pytest.raises(ConfigError) as err:
            run(base + [override])
        assert str(err.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_an_output_folder_that_cannot_be_created_is_refused_for_root_too(tmp_path):
    # /proc takes no new folder, whatever the user: os.access would say root may write there
    with pytest.raises(ConfigError) as err:
        run(["suite=smoke", "scale=tiny", "results_dir=/proc/x", f"runs_dir={tmp_path}/runs"])
    assert str(err.value).startswith("results_dir=/proc/x cannot be created in /proc (")
    assert str(err.value).endswith("); give results_dir a folder you can write")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, message", [
    ("suite.data.limit=8", "suite.data.limit = 8 images is below suite.train.global_batch = 16: every step would draw "
                           "images twice; raise suite.data.limit to at least 16 or lower the batch"),
    ("suite.backbones=[{name:dit,size:huge}]", "unknown size 'huge' for backbone 'dit' in suite smoke; its sizes: "),
])
def test_a_limit_below_the_batch_and_a_size_the_scale_would_replace_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        run(["suite=smoke", "scale=tiny", *dirs(tmp_path), override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert nothing_written(tmp_path)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^device=cuda, but torch .* sees no CUDA GPU here; use device=auto"):
        run(["suite=smoke", "scale=tiny", *dirs(tmp_path), "device=cuda"])
    assert nothing_written(tmp_path)


def test_help_lists_every_suite_and_scale_the_common_options_and_three_examples_that_parse():
    import re

    from tread_bench.engine.cli_help import EXAMPLES
    from tread_bench.engine.schema import check_command_line

    res = subprocess.run([sys.executable, "run_suite.py", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    for group in ("suite", "scale"):
        for yaml in (ROOT / "suites" / group).glob("*.yaml"):
            assert re.search(rf"^  {yaml.stem} +\S", out, re.M), yaml.stem
    for option in ("results_dir=outputs/results", "runs_dir=runs", "device=auto", "only=null", "plan=false"):
        assert f"  {option} " in out
    assert len(re.findall(r"^  python run_suite\.py suite=", out, re.M)) == 3
    assert "Powered by Hydra" not in out
    for _, command in EXAMPLES:
        assert check_command_line(command.split()[2:], str(ROOT / "suites")) is None, command
