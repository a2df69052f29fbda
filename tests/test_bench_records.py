"""Benchmark result lines: the JSON lines schema is enforced on write and read."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from harness import records
from harness.stats import summarize

ENV = {"cpu": "test cpu", "cores": 2, "versions": {"numpy": "2"}}
CASE = {"model": "tiny-sd15", "family": "sd", "backend": "onnxruntime", "precision": "fp32", "height": 64,
        "width": 64, "steps": 4, "batch": 1, "guidance_scale": 7.5, "scheduler": "PNDMScheduler"}


def latency(**over: Any) -> dict[str, Any]:
    metrics = {"load_s": 1.0, "first_s": 0.5, "e2e_s": summarize([0.1, 0.2, 0.3]).to_dict(), "images_per_s": 5.0,
               "peak_rss_mib": 100.0}
    fields = {"system": "sdexport", "status": "ok", "suite": "tiny-sd15", "case": dict(CASE), "metrics": metrics}
    fields.update(over)
    return records.make_record("latency", "run-1", ENV, **fields)


def test_make_record_stamps_schema_and_env() -> None:
    rec = latency()
    assert rec["schema"] == records.SCHEMA and rec["kind"] == "latency" and rec["run_id"] == "run-1"
    assert rec["env"]["cpu"] == "test cpu"
    json.dumps(rec, allow_nan=False)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.pop("env"), "env"),
    (lambda r: r["env"].pop("cores"), "cores"),
    (lambda r: r.update(kind="speed"), "unknown kind"),
    (lambda r: r.update(system="tensorflow"), "unknown system"),
    (lambda r: r.update(status="maybe"), "status"),
    (lambda r: r["case"].pop("steps"), "steps"),
    (lambda r: r["case"].update(steps="4"), "steps"),
    (lambda r: r["case"].update(batch=True), "batch"),
    (lambda r: r["metrics"].pop("peak_rss_mib"), "peak_rss_mib"),
    (lambda r: r["metrics"]["e2e_s"].update(median=9.0), "outside"),
    (lambda r: r["metrics"].update(images_per_s=float("nan")), "JSON|NaN|nan"),
    (lambda r: r.update(schema="other/0"), "schema"),
])
def test_validate_rejects(mutate: Any, message: str) -> None:
    rec = copy.deepcopy(latency())
    mutate(rec)
    with pytest.raises(ValueError, match=message):
        records.validate(rec)


def test_not_ok_needs_a_reason_but_no_metrics() -> None:
    rec = latency(status="skipped", metrics=None, reason="torch not installed")
    assert rec["reason"] == "torch not installed"
    with pytest.raises(ValueError, match="reason"):
        latency(status="failed", metrics=None)


def test_append_and_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.jsonl"
    first = latency()
    other = records.make_record("sgemm", "run-2", ENV, ceiling_gflops=100.0)
    assert records.append(path, [first]) == 1
    records.append(path, [other])
    path.write_text(path.read_text() + "\n")  # a blank line is tolerated
    assert records.read(path) == [first, other]
    assert records.read(path, kind="sgemm") == [other]


def test_read_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    bad = latency()
    bad["case"].pop("width")
    path.write_text(json.dumps(latency()) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"r\.jsonl:2: .*width"):
        records.read(path)


def test_append_validates_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    bad = latency()
    bad["kind"] = "nope"
    with pytest.raises(ValueError):
        records.append(path, [latency(), bad])
    assert not path.exists() or path.read_text() == ""
