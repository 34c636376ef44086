"""A measurement kind's table: upserted into results/<suite>.csv, rendered as Markdown, with the resolved suite."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from tread_bench.core.io import atomic_write_text
from tread_bench.measure.results import environment, upsert_csv, write_markdown


def write_table(cfg, suite, rows, key, notes) -> int:
    """Upsert ``rows`` by ``key`` into the suite's CSV, write its Markdown with ``notes`` and the resolved suite."""
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = suite.get("results_file") or f"{suite.name}.csv"
    table = upsert_csv(out / name, rows, key)
    write_markdown(out / name.replace(".csv", ".md"), pd.DataFrame(rows), f"{suite.name} ({cfg.scale.name})",
                   [n for n in notes if n] + [f"Measured on {environment().get('device')}."])
    atomic_write_text(out / f"{suite.name}_{cfg.scale.name}_config.yaml", OmegaConf.to_yaml(suite))
    print(f"wrote {out / name} ({len(rows)} rows of {len(table)})")
    return 0


