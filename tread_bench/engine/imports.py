"""User modules named on the command line (``imports=[my_pkg.my_backbone]``), imported before a suite is expanded.

Importing a module runs its decorators, so the backbones it registers (``@register_backbone``) can be
named in any suite. Modules are looked up like ``python -m`` would: on ``sys.path``, which includes
``PYTHONPATH``, installed packages, and the directory ``run_suite.py`` was started from.
"""
from __future__ import annotations

import importlib
import os
import sys

from tread_bench.core.errors import ConfigError

FIX = ("put the folder that contains it on PYTHONPATH, run from that folder, or install its package "
       "(pip install -e <its folder>); install this project with `pip install --no-build-isolation -e .` "
       "from its checkout so that the module can import it")


def import_user_modules(names, cwd: str | None = None) -> list:
    """Import each module in ``names`` (a list of dotted names, or one name); refuse with a ConfigError."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    names = [str(n).strip() for n in names]
    shown = f"imports=[{','.join(names)}]"
    cwd = os.getcwd() if cwd is None else cwd
    # `python path/to/run_suite.py` puts the script's folder on sys.path, not the caller's: add the caller's
    # folder last, so a module there is found without shadowing this project's or installed packages.
    if os.path.abspath(cwd) not in {os.path.abspath(p) for p in sys.path}:  # "" stands for the current folder
        sys.path.append(cwd)
    modules = []
    for name in names:
        if not name or not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(f"'{name}' listed in {shown} is not a module name (dotted, e.g. my_pkg.my_backbone)")
        try:
            modules.append(importlib.import_module(name))
        except (ImportError, SyntaxError) as err:
            reason = f"{type(err).__name__}: {err}".replace("\n", " ")
            raise ConfigError(f"cannot import module '{name}' listed in {shown}: {reason}; {FIX}") from err
    return modules
