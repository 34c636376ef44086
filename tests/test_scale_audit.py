"""Scale overlays change size, data, schedule and evaluation only: the rule (which keys of a suites/suite_scale/
file change what runs), every committed overlay obeying it, and validate_suite refusing one that does not."""
import pytest

from tread_bench.core.errors import ConfigError
from tread_bench.engine import schema
from tread_bench.engine.scale_audit import audit
from tread_bench.engine.schema import changes_what_runs, overlay_keys
from suite_helpers import compose_suite


def test_keys_of_a_suite_package_and_a_global_package_overlay(tmp_path):
    suite_level = tmp_path / "a.yaml"
    suite_level.write_text("# @package suite\ndefaults:\n  - common_cpu\nseeds: [0, 1]\n"
                           "train: {steps: 8}\nbackbones:\n  - {name: dit, size: tiny}\n"
                           "methods:\n  tread: {routes: ['1->3@0.5']}\n  sprint: {schedule: [{step: 6, drop_ratio: 0}]}\n"
                           "  old: null\n")
    assert overlay_keys(suite_level) == ["seeds", "train.steps", "backbones", "methods.tread.routes",
                                         "methods.sprint.schedule", "methods.old"]
    global_level = tmp_path / "b.yaml"
    global_level.write_text("# @package _global_\nscale:\n  size: null\nsuite:\n  eval: {every: 10}\n")
    assert overlay_keys(global_level) == ["scale.size", "eval.every"]
    assert [k for k in overlay_keys(suite_level) if changes_what_runs(k)] == ["backbones", "methods.tread.routes",
                                                                              "methods.old"]


def test_no_scale_overlay_changes_what_runs():
    rows = audit()
    assert len(rows) > 20
    assert {r["file"]: r["what_runs"] for r in rows if r["what_runs"]} == {}


def test_an_overlay_that_changes_what_runs_is_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "suite_scale").mkdir()
    (tmp_path / "suite_scale" / "smoke_tiny.yaml").write_text(
        "# @package suite\nmethods:\n  tread: {routes: ['1->2@0.5']}\n")
    monkeypatch.setattr(schema, "SUITES_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"^suites/suite_scale/smoke_tiny.yaml sets 'methods.tread.routes': a scale "
                                          r"changes size, data, schedule and evaluation, never which backbones"):
        schema.validate_suite(compose_suite(["suite=smoke", "scale=tiny"]))
