"""Precision per machine on OpenVINO: the int8 option, ``auto``'s choice rule, its cache, and doctor's report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdexport import Pipeline
from sdexport.engines import openvino as ov_backend
from sdexport.engines import openvino_precision as pp
from sdexport.specs import TensorSpec

PROMPT = "a red circle on a blue background"


class FakeClock:
    """A perf_counter that only moves when a fake engine runs, by that engine's cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Returns the reference output times (1 + error); each call costs ``cost`` fake seconds."""

    def __init__(self, clock: FakeClock, cost: float, error: float) -> None:
        self.clock, self.cost, self.error = clock, cost, error

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.clock.now += self.cost
        return {"out": np.full((2, 3), 1.0 + self.error, dtype=np.float32)}


@pytest.fixture
def fake_open(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, tuple[float, float]]], Any]:
    clock = FakeClock()
    monkeypatch.setattr(pp.time, "perf_counter", clock)

    def make(table: dict[str, tuple[float, float]]) -> Any:
        return lambda precision: FakeEngine(clock, *table[precision])

    return make


def test_auto_picks_the_fastest_precision_within_tolerance(fake_open: Any) -> None:
    table = {"f32": (1.0, 0.0), "bf16": (0.6, 0.004), "int8": (0.5, 0.003)}
    choice = pp.choose(fake_open(table), ("bf16", "int8"), {})
    assert choice.precision == "int8"
    assert choice.seconds == pytest.approx({"f32": 1.0, "bf16": 0.6, "int8": 0.5})
    assert choice.error["bf16"] == pytest.approx(0.004, rel=1e-3)


def test_auto_refuses_a_faster_precision_outside_tolerance(fake_open: Any) -> None:
    table = {"f32": (1.0, 0.0), "bf16": (0.8, 0.005), "int8": (0.2, 0.02)}  # int8: 2% off > AUTO_TOLERANCE (1%)
    assert pp.choose(fake_open(table), ("bf16", "int8"), {}).precision == "bf16"


def test_auto_keeps_f32_unless_a_candidate_is_clearly_faster(fake_open: Any) -> None:
    table = {"f32": (1.0, 0.0), "bf16": (0.97, 0.001), "f16": (1.4, 0.001)}  # 3% faster < MIN_GAIN (5%)
    assert pp.choose(fake_open(table), ("bf16", "f16"), {}).precision == "f32"


def test_a_non_finite_output_is_never_chosen(fake_open: Any) -> None:
    table = {"f32": (1.0, 0.0), "f16": (0.1, float("inf"))}
    choice = pp.choose(fake_open(table), ("f16",), {})
    assert choice.precision == "f32" and choice.error["f16"] == float("inf")


def test_offered_precisions_follow_the_cpu_plugin_capabilities() -> None:
    assert pp.offered(["FP32", "BF16", "INT8"]) == ("bf16", "int8")  # nncf is a dev dependency
    assert pp.offered(["FP32", "FP16"]) == ("f16",)
    assert pp.offered(["FP32"]) == ()


def test_sample_feeds_use_each_inputs_smallest_shape() -> None:
    inputs = (TensorSpec("input_ids", "int64", ("batch", "sequence")), TensorSpec("sample", "float32", ("b", 4)))
    profile = {"input_ids": {"min": [1, 77], "max": [4, 231]}, "sample": {"min": [2, 4], "max": [8, 4]}}
    feeds = pp.sample_feeds(inputs, profile)
    assert feeds["input_ids"].shape == (1, 77) and feeds["input_ids"].dtype == np.int64
    assert feeds["sample"].shape == (2, 4) and feeds["sample"].dtype == np.float32 and feeds["sample"].std() > 0


def test_the_choice_is_measured_once_per_machine_and_component(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    probes: list[str] = []

    def probe() -> pp.Choice:
        probes.append("x")
        return pp.Choice("bf16", {"f32": 1.0, "bf16": 0.5}, {"bf16": 0.001})

    first = pp.cached_choice("cpu A", "key1", probe, path)
    again = pp.cached_choice("cpu A", "key1", probe, path)
    assert first == again and len(probes) == 1
    pp.cached_choice("cpu B", "key1", probe, path)
    pp.cached_choice("cpu A", "key2", probe, path)
    assert len(probes) == 3
    assert set(json.loads(path.read_text())) == {"cpu A", "cpu B"}


def test_a_corrupt_cache_is_measured_again_and_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    path.write_text("{not json")
    choice = pp.cached_choice("cpu", "k", lambda: pp.Choice("f32", {"f32": 1.0}, {}), path)
    assert choice.precision == "f32"
    assert json.loads(path.read_text())["cpu"]["k"]["precision"] == "f32"


def test_auto_and_unknown_precisions_are_not_compile_configs() -> None:
    with pytest.raises(ValueError, match="resolved per component"):
        ov_backend.compile_config("auto")
    with pytest.raises(ValueError, match=r"precision='fp8' is not one of"):
        ov_backend.compile_config("fp8")
    assert ov_backend.compile_config("int8")["INFERENCE_PRECISION_HINT"] == "f32"  # int8 weights, f32 activations


def _images(folder: Path, precision: str) -> tuple[np.ndarray, Any]:
    pipe = Pipeline.load(folder, backend="openvino", engine_options={"precision": precision})
    result = pipe(PROMPT, seed=3, num_inference_steps=4, output_type="np")
    return np.asarray(result.images, dtype=np.float64), pipe


def test_int8_weights_run_close_to_f32(tiny_folder: Callable[[str], Path]) -> None:
    folder = tiny_folder("demo")  # trained weights: a random tiny model saturates its pixels
    ref, _ = _images(folder, "f32")
    got, pipe = _images(folder, "int8")
    assert {engine.precision for engine in pipe.engines.values()} == {"int8"}
    diff = np.abs(got - ref)
    # int8 weights (per-channel asymmetric), demo model, 4 steps: measured mean 1.65/255, max 19/255 on 64x64 px;
    # allowed: a mean within 3/255, and not the very same image (the weights really were compressed)
    assert 0 < diff.mean() <= 3.0, diff.mean()


def test_auto_measures_each_component_once_then_reads_the_cache(tiny_folder: Callable[[str], Path],
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setenv("SDEXPORT_CACHE_DIR", str(tmp_path))
    folder = tiny_folder("tiny-sd15")
    _, pipe = _images(folder, "auto")
    cache = json.loads((tmp_path / "openvino-precision.json").read_text())
    (entries,) = cache.values()
    assert len(entries) == len(pipe.engines)
    picked = {name: engine.precision for name, engine in pipe.engines.items()}
    assert set(picked.values()) <= {"f32", "bf16", "f16", "int8"}

    def no_measuring(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("auto measured again although every component is cached")

    monkeypatch.setattr(pp, "choose", no_measuring)
    _, again = _images(folder, "auto")
    assert {name: engine.precision for name, engine in again.engines.items()} == picked
    assert "auto cache: 4 component(s)" in ov_backend.probe().detail


def test_run_takes_the_openvino_precision_flag(tiny_folder: Callable[[str], Path], tmp_path: Path) -> None:
    from PIL import Image

    from sdexport.cli import main

    folder = tiny_folder("demo")
    pictures = {}
    for precision in ("f32", "int8"):
        out = tmp_path / f"{precision}.png"
        assert main(["run", str(folder), "--prompt", PROMPT, "--steps", "4", "--seed", "3", "--backend", "openvino",
                     "--openvino-precision", precision, "--out", str(out), "--no-progress"]) == 0
        pictures[precision] = np.asarray(Image.open(out), dtype=np.float64)
    ref, _ = _images(folder, "f32")
    assert np.array_equal(pictures["f32"], ref[0])  # the flag reached the engines: f32 is the library's f32
    assert not np.array_equal(pictures["int8"], pictures["f32"])
