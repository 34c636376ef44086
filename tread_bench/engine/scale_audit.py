"""What each scale overlay (suites/suite_scale/<suite>_<scale>.yaml) sets, and which of its keys change what runs
(the rule is tread_bench/engine/schema.py's: validate_suite refuses such a key).

    python -m tread_bench.engine.scale_audit     # a table: file, keys it sets, keys that change what runs
"""
from __future__ import annotations

import sys
from pathlib import Path

from .schema import SUITES_DIR, changes_what_runs, overlay_keys


def audit(folder: Path = SUITES_DIR / "suite_scale") -> list[dict]:
    """One row per scale overlay: its keys, and those of them that change what runs."""
    rows = []
    for path in sorted(folder.glob("*.yaml")):
        keys = overlay_keys(path)
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
