"""Prompt tables: JSONL, CSV or Parquet files read into numbered rows (the first data row is row 1)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdexport.errors import SdexportError

TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")


class SynthError(SdexportError, ValueError):
    """A synthesis run cannot start or continue (unreadable table, bad flag, output of another run)."""


@dataclass(frozen=True)
class TableRow:
    """One data row: its 1-based number and its values, or why it could not be parsed."""

    number: int
    values: dict[str, Any] | None
    error: str | None = None


def _jsonl(path: Path) -> list[TableRow]:
    rows: list[TableRow] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append(TableRow(number, None, f"line {number} is not valid JSON: {exc}"))
                continue
            if not isinstance(value, dict):
                rows.append(TableRow(number, None, f"line {number} is a JSON {type(value).__name__}; expected an "
                                     "object like {\"prompt\": \"...\"}"))
            else:
                rows.append(TableRow(number, value))
    return rows


def _csv(path: Path) -> list[TableRow]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        # CSV cells are text; an empty cell means "not given" (the flag's default applies)
        return [TableRow(number, {k: (v if v != "" else None) for k, v in row.items() if k is not None})
                for number, row in enumerate(reader, start=1)]


def _parquet(path: Path) -> list[TableRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise SynthError(f"{path}: reading Parquet needs pyarrow: pip install 'sdexport[synth]' (JSONL and CSV "
                         "tables need nothing extra)") from exc
    records = pq.read_table(path).to_pylist()
    return [TableRow(number, {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
            for number, row in enumerate(records, start=1)]


_READERS = {".jsonl": _jsonl, ".csv": _csv, ".parquet": _parquet}


def read_table(path: str | Path) -> list[TableRow]:
    """All rows of a JSONL, CSV or Parquet prompt table (format from the file suffix)."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise SynthError(f"{path}: unknown table format {path.suffix!r}; use one of {list(TABLE_SUFFIXES)}")
    if not path.is_file():
        raise SynthError(f"{path}: no such prompt table")
    try:
        return reader(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SynthError(f"{path}: cannot read the prompt table: {exc}") from exc
