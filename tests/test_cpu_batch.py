"""On a CPU engine the VAE runs one image per call, with the same pixels; the UNet keeps its whole batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdexport.runtime.backends import ComponentFiles


def files(name: str, max_batch: int) -> ComponentFiles:
    spec = type("Spec", (), {"inputs": (type("T", (), {"name": "x"})(),)})()
    return ComponentFiles(name, spec, Path("model.onnx"), {"x": {"max": [max_batch, 4]}}, "fp32", {})  # type: ignore[arg-type]


class Engine:
    def __init__(self, on_cpu: bool | None) -> None:
        if on_cpu is not None:
            self.on_cpu = on_cpu


@pytest.mark.parametrize(("name", "on_cpu", "expected"), [
    ("vae_decoder", True, 1), ("vae_encoder", True, 1), ("unet", True, 8), ("text_encoder", True, 8),
    ("vae_decoder", False, 8), ("vae_decoder", None, 8),  # a GPU engine, an engine that does not say
])
def test_run_batch_is_one_image_for_the_vae_on_a_cpu(name: str, on_cpu: bool | None, expected: int) -> None:
    assert files(name, 8).run_batch(Engine(on_cpu)) == expected


def test_the_cpu_batch_never_exceeds_the_engines_range() -> None:
    assert files("unet", 2).run_batch(Engine(True)) == 2
    assert files("vae_decoder", 1).run_batch(Engine(True)) == 1


def test_a_cpu_pipeline_decodes_image_by_image_with_the_same_pixels(tiny_pipe: Callable[[str], Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = tiny_pipe("tiny-sd15")
    monkeypatch.setattr(pipe.engines["unet"], "row_parallel", 1)  # one run per call (rows: test_row_parallel.py)
    batches: dict[str, list[int]] = {"unet": [], "vae_decoder": []}
    for name, seen in batches.items():
        engine = pipe.engines[name]
        assert engine.on_cpu is True
        monkeypatch.setattr(engine, "run", lambda feeds, run=engine.run, seen=seen: (
            seen.append(next(iter(feeds.values())).shape[0]), run(feeds))[1])
    args = {"prompt": ["a red circle", "a blue square", "a boat"], "num_inference_steps": 2, "seed": [1, 2, 3],
            "output_type": "np_float"}
    sliced = pipe(**args).images
    assert set(batches["unet"]) == {6}  # CFG doubles the UNet's batch, never sliced
    assert batches["vae_decoder"] == [1, 1, 1]
    monkeypatch.setattr(pipe.engines["vae_decoder"], "on_cpu", False)
    monkeypatch.setattr(pipe.engines["vae_decoder"], "row_parallel", 1)  # as a GPU engine
    batches["vae_decoder"].clear()
    whole = pipe(**args).images
    assert batches["vae_decoder"] == [3]
    np.testing.assert_allclose(sliced, whole, rtol=0, atol=1e-6)  # the same convolutions per image: float noise only
