"""A backbone in the user's own package, outside this repository, used through `run_suite.py imports=[...]`.

This is the README's "Adding a backbone" flow, run as a user would: a module in a folder of its own
(found through PYTHONPATH, or from the folder run_suite is started in), `imports=[my_nets.tiny_attn]` on
the command line, the backbone named in the suite, baseline and TREAD trained. Nothing is imported
into this test process: the module is only ever seen by the subprocess.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MODULE = "my_nets.tiny_attn"
NAME = "user_tiny_attn"

BACKBONE = textwrap.dedent('''
    """A user's backbone: 4 attention blocks of width 32 over an 8x8 grid of 4x4 patches."""
    import torch
    from torch import nn

    from backbones import BlockStack, register_backbone


    class AttnBlock(nn.Module):
        def __init__(self, dim, heads=2):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            self.gate = nn.Linear(dim, 2 * dim)  # conditioning gates the two residual branches
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

        def forward(self, x, c, grid=None, positions=None):  # attention ignores grid and positions
            g1, g2 = self.gate(c).unsqueeze(1).chunk(2, dim=-1)
            h = self.norm1(x)
            x = x + g1 * self.attn(h, h, h, need_weights=False)[0]
            return x + g2 * self.mlp(self.norm2(x))


    @register_backbone("%(name)s", sizes={"tiny": dict(depth=4, dim=32, patch=4)})
    class TinyAttn(BlockStack):
        def __init__(self, depth=4, dim=32, patch=4, input_size=32, in_channels=1, num_classes=10):
            super().__init__()
            self.input_size, self.in_channels, self.num_classes, self.patch = input_size, in_channels, num_classes, patch
            self.grid_size = (input_size // patch, input_size // patch)
            self.proj_in = nn.Linear(in_channels * patch * patch, dim)
            self.pos = nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.02)
            self.t_embed = nn.Linear(1, dim)
            self.y_embed = nn.Embedding(num_classes + 1, dim)  # + the "no label" class of classifier-free guidance
            self.blocks = nn.ModuleList(AttnBlock(dim) for _ in range(depth))
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
''') % {"name": NAME}


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """The user's own folder (outside the repository) with a package `my_nets`."""
    folder = tmp_path_factory.mktemp("user_project")
    assert ROOT not in folder.parents
    pkg = folder / "my_nets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tiny_attn.py").write_text(BACKBONE)
    (pkg / "broken.py").write_text("import not_installed_dependency_xyz\n")
    return folder


def env(pythonpath=None):
    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if pythonpath:
        e["PYTHONPATH"] = str(pythonpath)
    return e


def suite_args(out, module=MODULE):
    return ["suite=smoke", "scale=tiny", f"imports=[{module}]", f"suite.backbones=[{{name: {NAME}, size: tiny}}]",
            f"results_dir={out}/results", f"runs_dir={out}/runs", "suite.train.steps=6", "suite.train.log_every=3",
            "suite.data.name=synthetic", "suite.data.limit=64"]


def assert_baseline_and_tread(res, out):
    assert res.returncode == 0, res.stderr[-3000:]
    table = pd.read_csv(out / "results" / "smoke.csv")
    assert table.method.tolist() == ["baseline", "tread"]
    assert set(table.backbone) == {NAME} and set(table.status) == {"ok"}
    assert table.loc[table.method == "tread", "setting"].item() == "r(1->3)@0.5"
    assert (table.steps == 6).all() and table.final_loss.notna().all()


def test_user_backbone_on_pythonpath(user_folder, tmp_path):
    """`python run_suite.py ... imports=[my_nets.tiny_attn]` from the checkout, the user's folder on PYTHONPATH."""
    res = subprocess.run([PY, "run_suite.py", *suite_args(tmp_path)], cwd=ROOT, env=env(pythonpath=user_folder),
                         capture_output=True, text=True, timeout=600)
    assert_baseline_and_tread(res, tmp_path)


@pytest.mark.parametrize("launch", ["script", "installed"])
def test_user_backbone_from_its_own_folder(user_folder, tmp_path, launch):
    """Started in the user's folder, no PYTHONPATH: `python <checkout>/run_suite.py ...`, or `python -m run_suite
    ...` with this project installed (`pip install --no-build-isolation -e .`)."""
    if launch == "installed":
        found = subprocess.run([PY, "-I", "-c", "import importlib.util as u; s = u.find_spec('run_suite'); "
                                "print(s.origin if s else '')"], cwd=user_folder, capture_output=True, text=True)
        if found.stdout.strip() != str(ROOT / "run_suite.py"):
            pytest.skip("this checkout is not installed: `pip install --no-build-isolation -e .` "
                        "(scripts/setup.sh does it)")
    cmd = [PY, str(ROOT / "run_suite.py")] if launch == "script" else [PY, "-m", "run_suite"]
    res = subprocess.run([*cmd, *suite_args(tmp_path)], cwd=user_folder, env=env(), capture_output=True, text=True,
                         timeout=600)
    assert_baseline_and_tread(res, tmp_path)


def test_a_module_that_cannot_be_imported_is_one_error_line(user_folder, tmp_path):
    module = "no_such_module_xyz"
    res = subprocess.run([PY, "run_suite.py", *suite_args(tmp_path, module)], cwd=ROOT,
                         env=env(pythonpath=user_folder), capture_output=True, text=True, timeout=600)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot import module '{module}' listed in imports=[{module}]: ")
    assert f"No module named '{module}'" in line and "PYTHONPATH" in line and "pip install" in line
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()  # refused before anything


def test_import_errors_inside_the_module_and_bad_names_are_config_errors(user_folder, monkeypatch):
    from tread_bench.core.errors import ConfigError
    from tread_bench.engine import import_user_modules

    monkeypatch.setattr(sys, "path", list(sys.path))  # restored afterwards: the user's folder is appended
    expected = (r"cannot import module 'my_nets.broken' listed in imports=\[my_nets.broken\]: "
                r"ModuleNotFoundError: No module named 'not_installed_dependency_xyz'; .*PYTHONPATH")
    with pytest.raises(ConfigError, match=expected):
        import_user_modules(["my_nets.broken"], cwd=str(user_folder))  # found as run_suite finds the caller's folder
    sys.modules.pop("my_nets", None)
    with pytest.raises(ConfigError, match="'my-nets' listed in imports=\\[my-nets\\] is not a module name"):
        import_user_modules("my-nets")
    assert import_user_modules(None) == [] and import_user_modules([]) == []
