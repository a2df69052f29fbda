"""Benchmark timing: the stage proxy, the aggregation of runs, and the worker's measurement loop."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import child_environ
from harness.cases import SUITES, Case, with_overrides
from harness.timing import RunTiming, StageClock, TimedProxy, aggregate
from harness.worker import PREFIX, describe_error, measure_case


class Model:
    config = {"in_channels": 4}

    def __call__(self, x: float) -> float:
        time.sleep(0.002)
        return x * 2

    def decode(self, x: float) -> float:
        time.sleep(0.001)
        return x + 1


def test_timed_proxy_times_calls_and_forwards_attributes() -> None:
    sink: list[float] = []
    proxy = TimedProxy(Model(), sink)
    assert proxy(3) == 6 and proxy.config["in_channels"] == 4
    assert len(sink) == 1 and sink[0] >= 0.002
    vae_sink: list[float] = []
    vae = TimedProxy(Model(), vae_sink, method="decode")
    assert vae.decode(1) == 2 and vae(2) == 4  # only decode is timed
    assert len(vae_sink) == 1
    proxy.extra = 5
    assert proxy._inner.extra == 5


def test_stage_clock_take_resets() -> None:
    clock = StageClock()
    clock.text_encoder += [0.1, 0.2]
    clock.unet += [1.0, 1.5]
    clock.vae_decoder.append(0.3)
    run = clock.take(3.5)
    assert run == RunTiming(3.5, pytest.approx(0.3), [1.0, 1.5], 0.3)
    assert run.evaluations == 2 and run.outside_networks == pytest.approx(0.4)
    assert clock.take(1.0) == RunTiming(1.0, 0, [], 0)


def test_aggregate() -> None:
    runs = [RunTiming(1.0 + i * 0.1, 0.1, [0.2, 0.2, 0.3], 0.05, steps=[0.201, 0.2015, 0.302]) for i in range(3)]
    m = aggregate(RunTiming(5.0, 1, [1], 1), runs, batch=4)
    assert m["first_s"] == 5.0
    assert m["e2e_s"]["median"] == pytest.approx(1.1) and m["e2e_s"]["n"] == 3
    assert m["unet_step_s"]["n"] == 9 and m["unet_step_s"]["median"] == pytest.approx(0.2)
    assert m["unet_evaluations"] == 3
    assert m["overhead_step_ms"]["median"] == pytest.approx(1.5)
    assert m["images_per_s"] == pytest.approx(4 / 1.1)
    outside = (1.1 - 0.1 - 0.7 - 0.05) / 3 * 1e3
    assert m["outside_networks_step_ms"]["median"] == pytest.approx(outside)
    assert aggregate(runs[0], runs[:1], 1)["overhead_step_ms"] is not None
    no_steps = aggregate(runs[0], [RunTiming(1, 0, [0.5], 0)], 1)
    assert no_steps["overhead_step_ms"] is None
    with pytest.raises(ValueError):
        aggregate(runs[0], [], 1)


class FakeRunner:
    def __init__(self) -> None:
        self.calls = 0

    def run(self, case: Case, latents: np.ndarray) -> tuple[RunTiming, np.ndarray]:
        self.calls += 1
        total = 2.0 if self.calls == 1 else 1.0
        return RunTiming(total, 0.1, [0.2] * case.steps, 0.1), np.zeros((case.batch, 8, 8, 3), np.float32)

    def info(self) -> dict[str, Any]:
        return {"backend": "fake"}


def test_measure_case_counts_runs(tmp_path: Path) -> None:
    runner = FakeRunner()
    case = Case("tiny-sd15", 64, 64, 4, 2)
    m = measure_case(runner, case, case.latents(), warmups=2, repeats=3, output=tmp_path / "o.npy")
    assert runner.calls == 1 + 2 + 3
    assert m["first_s"] == 2.0 and m["e2e_s"]["median"] == 1.0 and m["images_per_s"] == 2.0
    assert m["case_peak_rss_mib"] > 0
    assert len(m["load_average"]) == 2 and all(x >= 0 for x in m["load_average"])
    assert np.load(tmp_path / "o.npy").shape == (2, 8, 8, 3)


def test_worker_process_reports_load_failure(tmp_path: Path) -> None:
    import subprocess
    import sys

    case = Case("tiny-sd15", 64, 64, 4, 1)
    np.save(tmp_path / "l.npy", case.latents())
    job = {"system": "sdexport", "paths": {"compiled": str(tmp_path / "missing")}, "cases": [case.to_dict()],
           "warmups": 0, "repeats": 1, "latents": {case.key: str(tmp_path / "l.npy")}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    out = subprocess.run([sys.executable, "-m", "harness.worker", str(tmp_path / "job.json")],
                         capture_output=True, text=True, timeout=120, check=True, env=child_environ()).stdout
    [result] = [json.loads(x[len(PREFIX):]) for x in out.splitlines() if x.startswith(PREFIX)]
    assert result["status"] == "failed" and result["reason"].startswith("load: ")


def test_describe_error() -> None:
    assert describe_error(ValueError("bad\nsecond line")) == "ValueError: bad"
    assert describe_error(RuntimeError()) == "RuntimeError"
    assert len(describe_error(OSError("x" * 1000))) == 300


def test_cases_latents_and_overrides() -> None:
    case = Case("tiny-sd15", 64, 96, 4, 2)
    lat = case.latents()
    assert lat.shape == (2, 4, 8, 12) and lat.dtype == np.float32
    np.testing.assert_array_equal(lat, case.latents())  # same seed, same noise for every system
    assert case.key == "tiny-sd15-64x96-s4-b2" and Case.from_dict(case.to_dict()) == case
    with pytest.raises(ValueError, match="multiples"):
        Case("m", 60, 64, 1, 1).latents()
    quick = with_overrides(SUITES["tiny-sd15"], steps=(2,), batches=(1,), repeats=1)
    assert [c.key for c in quick.cases] == ["tiny-sd15-64x64-s2-b1"] and quick.repeats == 1
    assert {(c.steps, c.batch) for c in SUITES["tiny-sd15"].cases} == {(4, 1), (20, 1), (4, 4), (20, 4)}
