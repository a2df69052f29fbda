"""Prompt tables for the synth tests (JSONL, CSV, Parquet) and a byte-level snapshot of an output folder."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SUBJECTS = ("a red circle", "a blue square", "a green triangle", "a yellow star", "a white cross")


def twenty_rows() -> list[dict[str, Any]]:
    """20 rows: mixed sizes (two groups), explicit ids and seeds on some, an extra column on all."""
    rows: list[dict[str, Any]] = []
    for i in range(20):
        row: dict[str, Any] = {"prompt": f"{SUBJECTS[i % 5]}, number {i}", "source": f"batch-{i % 3}"}
        if i % 4 == 0:
            row["id"] = f"item_{i:02d}"
        if i % 5 == 1:
            row["seed"] = 1000 + i
        if i % 6 == 2:
            row["width"], row["height"] = 32, 48
        rows.append(row)
    return rows


def write_table(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows as .jsonl, .csv (empty cell = missing) or .parquet, by the path's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = list(dict.fromkeys(k for r in rows for k in r))
        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metadata(folder: Path) -> list[dict[str, Any]]:
    """The records of an imagefolder output (``train/metadata.jsonl``) or a WebDataset output (``metadata.jsonl``)."""
    path = folder / "train" / "metadata.jsonl"
    path = path if path.is_file() else folder / "metadata.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
