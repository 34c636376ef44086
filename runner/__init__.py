"""Suite orchestration: config -> validated runs -> training / measurement -> result tables."""
from .guidance import run_guidance_suite
from .measure import run_flops_suite, run_throughput_suite
from .spec import RunSpec, expand_runs, resolve_suite, validate_run
from .train import run_train_suite

SUITE_KINDS = {"train": run_train_suite, "flops": run_flops_suite, "throughput": run_throughput_suite,
               "guidance": run_guidance_suite}

__all__ = ["SUITE_KINDS", "RunSpec", "expand_runs", "resolve_suite", "validate_run"]
