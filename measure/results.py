"""Result tables: keyed upserts into CSV (a rerun replaces its rows), Markdown renderings, environment."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import torch

from core.io import atomic_write, atomic_write_text


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


def upsert_csv(path: str | Path, rows: Sequence[dict], key: Sequence[str]) -> pd.DataFrame:
    """Write ``rows`` into the CSV at ``path``, replacing existing rows with the same ``key`` values.

    Rows of other keys (other suites, scales or runs) are kept; the write is atomic.
    """
    path = Path(path)
    new = pd.DataFrame(list(rows))
    if path.exists() and path.stat().st_size:
        old = pd.read_csv(path)
        if all(k in old.columns for k in key) and len(new):
            new_keys = set(map(tuple, new[list(key)].astype(str).values))
            stale = old[list(key)].astype(str).apply(tuple, axis=1).isin(new_keys)
            old = old[~stale]
        table = pd.concat([old, new], ignore_index=True) if len(old) else new
    else:
        table = new
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    return table


def write_markdown(path: str | Path, table: pd.DataFrame, title: str, notes: Iterable[str] = ()) -> None:
    body = [f"# {title}", ""] + [f"{n}" for n in notes] + ([""] if notes else [])
    body.append(table.to_markdown(index=False, floatfmt=".4g") if len(table) else "(no rows)")
    atomic_write_text(path, "\n".join(body) + "\n")
