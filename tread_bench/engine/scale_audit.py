"""What each scale overlay (suites/suite_scale/<suite>_<scale>.yaml) sets, and which of its keys change what runs.

A scale should change size, data, schedule and evaluation cadence only; the keys that change which backbones,
methods, routes or method arguments run are ``backbones`` and ``methods.<entry>`` (everything of a method entry
but its ``schedule``, the steps at which its fine-tune stages start).

    python -m tread_bench.engine.scale_audit     # a table: file, keys it sets, keys that change what runs
"""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from .schema import SUITES_DIR


def set_keys(path: Path) -> list[str]:
    """The dotted keys a scale overlay sets itself (its ``defaults`` are other files), at suite level: a
    ``# @package _global_`` file's ``suite.`` keys without the prefix, its ``scale.`` keys with it."""
    text = path.read_text()
    tree = OmegaConf.to_container(OmegaConf.load(path)) or {}
    tree.pop("defaults", None)
    if "@package _global_" in text:
        tree = {**{f"scale.{k}": v for k, v in (tree.pop("scale", None) or {}).items()}, **(tree.pop("suite", None) or {}),
                **tree}
    keys = []
    for key, value in tree.items():
        if key == "methods" and isinstance(value, dict):
            for entry, spec in value.items():
                if isinstance(spec, dict):
                    keys += [f"methods.{entry}.{k}" for k in spec]
                else:
                    keys.append(f"methods.{entry}")
        elif isinstance(value, dict) and key in ("train", "eval", "data"):
            keys += [f"{key}.{k}" for k in value]
        else:
            keys.append(key)
    return keys


def changes_what_runs(key: str) -> bool:
    """Whether setting ``key`` changes which backbones, methods, routes or method arguments run."""
    if key == "backbones":
        return True
    parts = key.split(".")
    return parts[0] == "methods" and not (len(parts) == 3 and parts[2] == "schedule")


def audit(folder: Path = SUITES_DIR / "suite_scale") -> list[dict]:
    """One row per scale overlay: its keys, and those of them that change what runs."""
    rows = []
    for path in sorted(folder.glob("*.yaml")):
        keys = set_keys(path)
        rows.append({"file": path.name, "keys": keys, "what_runs": [k for k in keys if changes_what_runs(k)]})
    return rows


def main() -> None:
    rows = audit(Path(sys.argv[1]) if sys.argv[1:] else SUITES_DIR / "suite_scale")
    print("| file | keys it sets | keys that change what runs |\n|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {', '.join(r['keys']) or '(defaults only)'} | {', '.join(r['what_runs']) or '-'} |")
    changing = [r for r in rows if r["what_runs"]]
    print(f"\n{len(rows)} files; {len(changing)} set keys that change what runs, "
          f"{sum(len(r['what_runs']) for r in rows)} such keys in all")


if __name__ == "__main__":
    main()
