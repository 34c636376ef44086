"""A measurement kind's table: upserted into results/<suite>.csv, rendered as Markdown, with the resolved suite; what
the committed reference tables say a sitting will take."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write_text
from tread_bench.measure.results import environment, read_table, upsert_csv, write_markdown

#: the committed reference tables (results/ of the checkout)
COMMITTED_RESULTS = Path(__file__).resolve().parents[2] / "results"


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


def runs_table_name(suite) -> str:
    """The file name of a training suite's runs table (one row per run and evaluation)."""
    return suite.get("results_file") or f"{suite.name}_runs.csv"


def committed_training_time(suite, scale: str, runs: list):
    """(seconds, device, runs found): the summed final training time (``wall_time_s``, evaluation excluded) of the
    ``runs`` whose configuration the committed reference table of a training suite (results/<suite>_runs.csv) holds
    at ``scale``: the same run (run id, seed, method setting), training steps and images per step, and the same
    data as the committed resolved suite (results/<suite>_<scale>_config.yaml). None when it holds none of them: a
    run configured otherwise gets no estimate rather than the time of another configuration."""
    table = COMMITTED_RESULTS / runs_table_name(suite)
    try:
        committed = read_table(table, ["suite", "scale", "run_id", "seed"])
    except ConfigError:
        return None
    if committed is None or "wall_time_s" not in committed:
        return None
    if not _same_data(suite, COMMITTED_RESULTS / f"{suite.name}_{scale}_config.yaml"):
        return None
    rows = committed[(committed.suite == suite.name) & (committed.scale == scale) & (committed.status == "ok")]
    last = rows.sort_values("step").groupby(["run_id", "seed"]).tail(1).set_index(["run_id", "seed"])
    train = suite.get("train") or {}
    steps, batch = train.get("steps"), train.get("global_batch")
    found = []
    for run in runs:
        if (run.run_id, run.seed) not in last.index:
            continue
        row = last.loc[(run.run_id, run.seed)]
        if steps is not None and int(row.step) != steps:
            continue
        if batch is not None and round(row.images_seen / row.step) != batch:
            continue
        if run.setting and "setting" in row and row.setting != run.setting:
            continue
        found.append(float(row.wall_time_s))
    if not found:
        return None
    return float(sum(found)), str(rows.device.iloc[0]), len(found)


def _same_data(suite, committed_config: Path) -> bool:
    """Whether ``suite`` reads the data the committed study read (True when either side does not say)."""
    if suite.get("data") is None or not committed_config.exists():
        return True
    theirs = OmegaConf.load(committed_config).get("data")
    if theirs is None:
        return True
    return OmegaConf.to_container(theirs, resolve=True) == OmegaConf.to_container(suite.data, resolve=True)
