"""Result lines: one JSON object per measurement, with the environment; schema checks, append and read."""

from __future__ import annotations

import datetime as _dt
import json
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.systems import SYSTEM_NAMES

SCHEMA = "sdexport-bench/1"
KINDS = ("latency", "sgemm", "flops", "ort_tuning")
STATUSES = ("ok", "failed", "skipped")
SYSTEMS = SYSTEM_NAMES
CASE_FIELDS = {"model": str, "family": str, "backend": str, "precision": str, "height": int, "width": int,
               "steps": int, "batch": int, "guidance_scale": float, "scheduler": str}
LATENCY_METRICS = ("load_s", "first_s", "e2e_s", "images_per_s", "peak_rss_mib")
SUMMARY_FIELDS = ("n", "median", "min", "max", "p25", "p75")


def new_run_id() -> str:
    """A short id shared by every line of one benchmark invocation."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def make_record(kind: str, run_id: str, env: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """A result line of ``kind`` (validated), stamped with the schema, run id, time and environment."""
    record = {"schema": SCHEMA, "kind": kind, "run_id": run_id,
              "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "env": dict(env), **fields}
    validate(record)
    return record


def _need(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "record") -> Any:
    if key not in record:
        raise ValueError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ValueError(f"{where}: field {key!r} should be {kind}, got {type(value).__name__} {value!r}")
    return value


def _check_summary(data: Any, where: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a summary object, got {data!r}")
    for key in SUMMARY_FIELDS:
        _need(data, key, (int, float), where)
    if not data["min"] <= data["median"] <= data["max"]:
        raise ValueError(f"{where}: median {data['median']} outside [min, max] = [{data['min']}, {data['max']}]")


def _validate_latency(record: Mapping[str, Any]) -> None:
    system = _need(record, "system", str)
    if system not in SYSTEMS:
        raise ValueError(f"record: unknown system {system!r}; expected one of {SYSTEMS}")
    status = _need(record, "status", str)
    if status not in STATUSES:
        raise ValueError(f"record: status {status!r} is not one of {STATUSES}")
    case = _need(record, "case", dict)
    for key, kind in CASE_FIELDS.items():
        _need(case, key, (int, float) if kind is float else kind, "case")
    if status != "ok":
        _need(record, "reason", str)
        return
    metrics = _need(record, "metrics", dict)
    for key in LATENCY_METRICS:
        if key not in metrics:
            raise ValueError(f"metrics: missing {key!r}")
    _check_summary(metrics["e2e_s"], "metrics.e2e_s")
    for key in ("unet_step_s", "text_encoder_s", "vae_decoder_s"):
        if metrics.get(key) is not None:
            _check_summary(metrics[key], f"metrics.{key}")


def validate(record: Mapping[str, Any]) -> None:
    """Raise ValueError naming the field when ``record`` does not follow the schema."""
    if record.get("schema") != SCHEMA:
        raise ValueError(f"record: schema {record.get('schema')!r} is not {SCHEMA!r}")
    kind = _need(record, "kind", str)
    if kind not in KINDS:
        raise ValueError(f"record: unknown kind {kind!r}; expected one of {KINDS}")
    for key in ("run_id", "time"):
        _need(record, key, str)
    env = _need(record, "env", dict)
    for key in ("cpu", "cores", "versions"):
        if key not in env:
            raise ValueError(f"env: missing {key!r}")
    if kind == "latency":
        _validate_latency(record)
    json.dumps(record, allow_nan=False)  # must be strict JSON


def append(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Append validated records to a JSON lines file; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for record in records:
        validate(record)
        lines.append(json.dumps(record, sort_keys=True, allow_nan=False))
    with path.open("a", encoding="utf-8") as fh:
        fh.writelines(line + "\n" for line in lines)
    return len(lines)


def read(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a JSON lines file (optionally one kind), each validated; blank lines are skipped."""
    out = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            validate(record)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from exc
        if kind is None or record["kind"] == kind:
            out.append(record)
    return out
