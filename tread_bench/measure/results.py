"""Result tables: keyed upserts into CSV (a rerun replaces its rows), Markdown renderings, environment."""
from __future__ import annotations

import fcntl
import os
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from tread_bench.core.errors import ConfigError
from tread_bench.core.io import atomic_write, atomic_write_text


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cpu)"


def environment(device: str | torch.device = "cpu") -> dict:
    return {"device": device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda if torch.device(device).type == "cuda" else ""}


@contextmanager
def tables_lock(folder: str | Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder``'s tables of ``name`` (a hidden ``.<name>.lock`` file, fcntl.flock)
    while they are read, merged and written: jobs of a multirun (submitit, SLURM) that finish together would
    otherwise each read the table before the other wrote it, and one job's rows would be lost."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _unreadable(path: Path, why: str) -> ConfigError:
    return ConfigError(f"results table {path} cannot be read ({why}); move it aside or delete it (a rerun writes it "
                       "again: finished runs are not trained again)")


def read_table(path: str | Path, key: Sequence[str] = ()) -> pd.DataFrame | None:
    """The CSV at ``path``, or None when there is none or it holds no columns (a table written with no rows, e.g.
    a speedup table of an ``only=`` sitting that trained no baseline, is one empty line). A file that is not a
    table, or a row without a value in a ``key`` column (a write cut short), is refused in one line."""
    path = Path(path)
    try:
        table = pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return None
    except UnicodeDecodeError as err:
        raise _unreadable(path, f"not UTF-8 text at byte {err.start}") from None
    except (pd.errors.ParserError, ValueError) as err:
        raise _unreadable(path, " ".join(str(err).split())) from None
    for column in key:
        if column in table.columns and table[column].isna().any():
            line = int(table.index[table[column].isna()][0]) + 2  # 1-based, after the header line
            raise _unreadable(path, f"line {line} has no {column}: a row cut short")
    return table


def _key_value(value):
    """A key cell as a comparable value: numbers by value (a seed read back as 0.0 is the seed 0), text as text."""
    if isinstance(value, (bool, np.bool_)):
        return ("number", float(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        return ("number", float(value)) if value == value else ("missing", "")
    return ("text", str(value))


def upsert_csv(path: str | Path, rows: Sequence[dict], key: Sequence[str],
               replace_where: Optional[dict] = None) -> pd.DataFrame:
    """Write ``rows`` into the CSV at ``path``, replacing existing rows with the same ``key`` values.

    Rows of other keys (other suites, scales or runs) are kept, except those whose columns equal every value of
    ``replace_where`` (a table recomputed whole for, say, one scale: its rows of a method no longer there go);
    the write is atomic.
    """
    path = Path(path)
    new = pd.DataFrame(list(rows))
    old = read_table(path, key)
    if old is not None and replace_where and all(c in old.columns for c in replace_where):
        old = old[~np.logical_and.reduce([old[c] == v for c, v in replace_where.items()])]
    if old is not None:
        if all(k in old.columns for k in key) and len(new):
            new_keys = {tuple(_key_value(v) for v in row) for row in new[list(key)].itertuples(index=False)}
            stale = [tuple(_key_value(v) for v in row) in new_keys for row in old[list(key)].itertuples(index=False)]
            old = old[~np.asarray(stale, dtype=bool)]
        table = pd.concat([old, new], ignore_index=True) if len(old) else new
    else:
        table = new
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    return table


def write_markdown(path: str | Path, table: pd.DataFrame, title: str, notes: Iterable[str] = ()) -> None:
    body = [f"# {title}", ""] + [f"{n}" for n in notes] + ([""] if notes else [])
    body.append(table.to_markdown(index=False, floatfmt=".4g") if len(table) else "(no rows)")
    atomic_write_text(path, "\n".join(body) + "\n")
