"""A Mamba run on CUDA without the fused kernels of mamba-ssm / causal-conv1d is refused when its runs are
validated, before anything trains, unless suite.allow_slow_scan=true, which prints one warning line instead.
Simulated on CPU machines: torch.cuda.is_available reports a GPU and the kernels' imports fail (or succeed, as
stand-in modules)."""
import sys
import types

import pytest
import torch

import tread_bench.engine
from backbones import mamba
from tread_bench.core.errors import ConfigError
from tread_bench.engine.spec import prepare_runs
from suite_helpers import compose_suite, run

MAMBA = "suite.backbones=[{name: mamba, size: tiny}]"


KERNEL_MODULES = ("causal_conv1d", "mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface",
                  "selective_scan_cuda")


@pytest.fixture
def kernels(monkeypatch):
    """``kernels(missing)``: the modules named in ``missing`` fail to import, the other kernel modules import
    as stand-ins (``kernels(())``: all of them)."""
    def simulate(missing=KERNEL_MODULES):
        for name in KERNEL_MODULES:
            module = None if name in missing else types.ModuleType(name)  # None in sys.modules: the import fails
            if module is not None:
                module.causal_conv1d_fn = module.selective_scan_fn = lambda *a, **k: None
            monkeypatch.setitem(sys.modules, name, module)
        mamba.import_fused_kernels.cache_clear()

    mamba.warn_slow_scan.cache_clear()
    yield simulate
    mamba.import_fused_kernels.cache_clear()  # what this machine really has, for the tests after this one
    mamba.warn_slow_scan.cache_clear()


@pytest.fixture
def gpu(monkeypatch):
    """torch reports a CUDA GPU (device=cuda passes the device check, device=auto picks cuda)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def prepared(overrides):
    """The validation before training (run_suite.py's order): the suite's schema, then prepare_runs."""
    cfg = compose_suite(["suite=smoke", "scale=tiny", *overrides])
    tread_bench.engine.validate_suite(cfg)
    return prepare_runs(cfg, tread_bench.engine.resolve_suite(cfg), (1, 32, 32), 10)


def test_a_mamba_run_on_cuda_without_the_kernels_is_refused_before_training(kernels, gpu, tmp_path):
    kernels()
    with pytest.raises(ConfigError) as err:
        run(["suite=smoke", "scale=tiny", MAMBA, "device=cuda", f"results_dir={tmp_path}/results",
             f"runs_dir={tmp_path}/runs"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("run mamba-tiny-baseline-seed0: mamba on CUDA needs the fused")
    for part in ("(ModuleNotFoundError: ", "pip install --no-build-isolation -e '.[cuda]'", "mamba-ssm>=2.2",
                 "causal-conv1d>=1.4", "+suite.allow_slow_scan=true", "4-5x slower"):
        assert part in message, part
    assert not (tmp_path / "runs").exists()  # refused before the first run trained
    with pytest.raises(ConfigError, match="mamba on CUDA needs the fused kernels"):
        prepared([MAMBA])  # device=auto picks the GPU


def test_allow_slow_scan_prints_one_warning_line_for_all_runs(kernels, gpu, capsys):
    kernels()
    runs = prepared([MAMBA, "device=cuda", "+suite.allow_slow_scan=true", "+suite.seeds=[0,1]"])
    assert len(runs) == 4
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "mamba on CUDA" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: mamba on CUDA runs the pure-PyTorch scan, about 4-5x")
    assert "pip install --no-build-isolation -e '.[cuda]'" in lines[0]


@pytest.mark.parametrize("overrides", [
    [MAMBA, "device=cpu"],                                   # the CPU has its own fused scan
    ["device=cuda"],                                         # the smoke suite's DiT has no scan
    [MAMBA, "device=cuda", "plan=true"],                     # a plan trains nothing
    ["suite.backbones=[{name: mamba, size: tiny, overrides: {use_fused_kernels: false}}]", "device=cuda"],  # asked
], ids=["cpu", "dit", "plan", "pure-path-asked-for"])
def test_runs_that_need_no_cuda_kernels_pass(kernels, gpu, capsys, overrides):
    kernels()
    assert prepared(overrides)
    assert "mamba on CUDA" not in capsys.readouterr().err


def test_kernels_that_import_pass_without_a_warning(kernels, gpu, capsys):
    kernels(())
    assert prepared([MAMBA, "device=cuda"])
    assert "mamba on CUDA" not in capsys.readouterr().err


def test_mamba_ssm_built_without_its_selective_scan_kernel_is_refused(kernels, gpu):
    kernels(("selective_scan_cuda",))  # mamba-ssm newer than 2.3.2 built without MAMBA_KEEP_CUDA_BUILD=TRUE
    with pytest.raises(ConfigError, match=r"do not import here \(ModuleNotFoundError: .*selective_scan_cuda"):
        prepared([MAMBA, "device=cuda"])


def test_allow_slow_scan_must_be_a_boolean_and_stays_out_of_the_config_hash():
    cfg = compose_suite(["suite=smoke", "scale=tiny", "+suite.allow_slow_scan=maybe"])
    with pytest.raises(ConfigError, match="allow_slow_scan"):
        tread_bench.engine.validate_suite(cfg)
    from tread_bench.engine.spec import config_hash

    suite = {"name": "smoke", "seed": 0}
    assert config_hash({"suite": {**suite, "allow_slow_scan": True}}) == config_hash({"suite": suite})
