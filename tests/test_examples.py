"""The plug-in examples of docs/ (docs/examples/*.py) are complete files: a user's first command with them trains a
run of each, with no file of this repository changed."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def test_the_backbone_and_method_examples_train_through_imports(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, str(ROOT / "run_suite.py"), "suite=smoke", "scale=tiny",
                          "imports=[my_backbone,my_method]", "suite.backbones=[{name: my_net, size: tiny}]",
                          "+suite.methods.mine={kind: keep_middle, keep: 0.5}", "suite.train.steps=4",
                          "suite.eval.every=0", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"],
                         cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "smoke.csv")
    assert sorted(table["method"]) == ["baseline", "mine", "tread"]
    assert set(table["backbone"]) == {"my_net"} and set(table["status"]) == {"ok"}
    assert table.loc[table["method"] == "mine", "setting"].item() == "keep 0.5 of the tokens in blocks 1..2"
