"""The scale-overlay audit: which keys a suites/suite_scale/ file sets, and which of them change what runs."""
from tread_bench.engine.scale_audit import audit, changes_what_runs, set_keys

# issue 31: the overlays that still change what runs (backbone lists, MaskDiT decoder widths); none may be added,
# and each one fixed leaves this set
STILL_CHANGING = {"crossover_tiny.yaml", "methods_cpu.yaml", "methods_flops_tiny.yaml",
                  "methods_throughput_cpu.yaml", "methods_tiny.yaml"}


def test_keys_of_a_suite_package_and_a_global_package_overlay(tmp_path):
    suite_level = tmp_path / "a.yaml"
    suite_level.write_text("# @package suite\ndefaults:\n  - common_cpu\nseeds: [0, 1]\n"
                           "train: {steps: 8}\nbackbones:\n  - {name: dit, size: tiny}\n"
                           "methods:\n  tread: {routes: ['1->3@0.5']}\n  sprint: {schedule: [{step: 6, drop_ratio: 0}]}\n"
                           "  old: null\n")
    assert set_keys(suite_level) == ["seeds", "train.steps", "backbones", "methods.tread.routes",
                                     "methods.sprint.schedule", "methods.old"]
    global_level = tmp_path / "b.yaml"
    global_level.write_text("# @package _global_\nscale:\n  size: null\nsuite:\n  eval: {every: 10}\n")
    assert set_keys(global_level) == ["scale.size", "eval.every"]
    assert [k for k in set_keys(suite_level) if changes_what_runs(k)] == ["backbones", "methods.tread.routes",
                                                                          "methods.old"]


def test_no_scale_overlay_starts_changing_what_runs():
    changing = {row["file"] for row in audit() if row["what_runs"]}
    assert changing <= STILL_CHANGING, f"scale overlays that change what runs: {sorted(changing - STILL_CHANGING)}"
