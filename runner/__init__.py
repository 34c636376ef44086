"""Suite orchestration: config -> validated runs -> training / measurement -> result tables."""
from .dryrun import run_kind
from .guidance import run_guidance_suite
from .imports import import_user_modules
from .measure import run_flops_suite, run_throughput_suite
from .plan import run_plan
from .schema import validate_suite
from .spec import RunSpec, apply_auto_scale, choose_scale, expand_runs, resolve_suite, validate_run
from .train import run_train_suite

SUITE_KINDS = {"train": run_train_suite, "flops": run_flops_suite, "throughput": run_throughput_suite,
               "guidance": run_guidance_suite}

__all__ = ["SUITE_KINDS", "apply_auto_scale", "choose_scale", "import_user_modules", "RunSpec", "expand_runs", "resolve_suite",
           "run_kind", "run_plan", "validate_run", "validate_suite"]
