"""The run engine: a composed suite checked against its schema, expanded into runs that are all validated before
any runs, handed to its suite kind (tread_bench/engine/kinds.py), and its tables written."""
from .imports import import_user_modules
from .kinds import SUITE_KINDS, SuiteKind, list_suite_kinds, register_suite_kind, run_suite_kind
from .plan import run_plan
from .schema import validate_suite
from .spec import RunSpec, apply_auto_scale, choose_scale, expand_runs, prepare_runs, resolve_suite, validate_run

__all__ = ["SUITE_KINDS", "SuiteKind", "RunSpec", "apply_auto_scale", "choose_scale", "expand_runs",
           "import_user_modules", "list_suite_kinds", "prepare_runs", "register_suite_kind", "resolve_suite",
           "run_plan", "run_suite_kind", "validate_run", "validate_suite"]
