"""Rows in parallel: small networks run slices of a batch at once, one single-threaded run per core."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdexport.engines.ort import ROWS_BELOW, row_parallel_for
from sdexport.runtime.backends import EngineRunner, row_slices
from sdexport.runtime.pipeline import Pipeline


@pytest.mark.parametrize(("total", "max_batch", "parallel", "expected"), [
    (8, 8, 1, [(0, 8)]),
    (8, 8, 2, [(0, 4), (4, 8)]),
    (5, 8, 2, [(0, 3), (3, 5)]),
    (1, 8, 2, [(0, 1)]),  # one row: nothing to split
    (4, 1, 2, [(0, 1), (1, 2), (2, 3), (3, 4)]),  # the VAE image by image
    (8, 3, 2, [(0, 3), (3, 6), (6, 8)]),  # the engine's batch range still caps a slice
    (6, 8, 4, [(0, 2), (2, 4), (4, 6)]),
])
def test_row_slices(total: int, max_batch: int, parallel: int, expected: list[tuple[int, int]]) -> None:
    assert row_slices(total, max_batch, parallel) == expected


@pytest.mark.parametrize(("size", "parallel", "threads", "providers", "expected"), [
    (ROWS_BELOW - 1, "auto", 2, None, 2),  # a tiny network: one slice per core
    (ROWS_BELOW, "auto", 2, None, 1),  # full size keeps its intra-op threads
    (ROWS_BELOW - 1, "threads", 2, None, 1),
    (None, "auto", 2, None, 1), (None, "rows", 2, None, 2),  # size not known: threads unless asked
    (10 * ROWS_BELOW, "rows", 4, None, 4),
    (ROWS_BELOW - 1, "auto", 1, None, 1),  # one core: nothing to run beside
    (ROWS_BELOW - 1, "rows", 2, ["CUDAExecutionProvider", "CPUExecutionProvider"], 1),  # CPU only
])
def test_row_parallel_for(size: int | None, parallel: str, threads: int, providers: list[str] | None,
                          expected: int) -> None:
    assert row_parallel_for(size, parallel, threads, providers) == expected


def test_an_unknown_parallel_value_is_named() -> None:
    with pytest.raises(ValueError, match=r"parallel='cores'.*'auto', 'threads', 'rows'"):
        row_parallel_for(1, "cores")


class Recorder:
    """An engine that adds 1 to its input and records, per call, its rows and the thread that ran it."""

    def __init__(self, row_parallel: int) -> None:
        self.row_parallel = row_parallel
        self.calls: list[tuple[int, str]] = []
        self.lock = threading.Lock()
        self.both_running = threading.Barrier(2, timeout=5)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.calls.append((feeds["x"].shape[0], threading.current_thread().name))
        if self.row_parallel == 2:
            self.both_running.wait()  # returns only when both slices run at the same time
        return {"y": feeds["x"] + 1}


def test_the_runner_runs_slices_at_once_in_order() -> None:
    engine = Recorder(row_parallel=2)
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    out = EngineRunner(engine, max_batch=8)({"x": x})
    np.testing.assert_array_equal(out["y"], x + 1)  # slices concatenated back in row order
    assert sorted(rows for rows, _ in engine.calls) == [4, 4]
    threads = sorted(name for _, name in engine.calls)
    assert threads[0] == threading.current_thread().name  # the caller runs one slice itself
    assert threads[1].startswith("sdexport-rows")


class Lanes(Recorder):
    """A Recorder that returns each slice's first value, to check the order slices come back in."""

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.calls.append((feeds["x"].shape[0], threading.current_thread().name))
        return {"y": feeds["x"] * 10}


def test_more_slices_than_threads_share_the_threads_in_order() -> None:
    engine = Lanes(row_parallel=2)
    x = np.arange(5, dtype=np.float32).reshape(5, 1)
    out = EngineRunner(engine, max_batch=1)({"x": x})  # five one-row slices (the VAE image by image) on two threads
    np.testing.assert_array_equal(out["y"], x * 10)
    by_thread: dict[str, int] = {}
    for _, name in engine.calls:
        by_thread[name] = by_thread.get(name, 0) + 1
    assert sorted(by_thread.values()) == [2, 3]  # every 2nd slice on each thread, the caller's first


def test_a_runner_without_row_parallel_calls_once_on_its_own_thread() -> None:
    engine = Recorder(row_parallel=1)
    x = np.ones((8, 3), np.float32)
    EngineRunner(engine, max_batch=8)({"x": x})
    assert engine.calls == [(8, threading.current_thread().name)]


def test_rows_in_parallel_match_intra_op_threads(tiny_folder: Callable[[str], Path],
                                                 tiny_pipe: Callable[[str], Any]) -> None:
    rows = tiny_pipe("tiny-sdxl")
    unet = rows.engines["unet"]
    if unet.row_parallel == 1:
        pytest.skip("one core: rows in parallel need two")
    assert unet.options.intra_op_num_threads == 1
    threads = Pipeline.load(tiny_folder("tiny-sdxl"), engine_options={"parallel": "threads"})
    assert threads.engines["unet"].row_parallel == 1
    assert threads.engines["unet"].options.intra_op_num_threads > 1
    args = {"prompt": ["a red circle", "a blue square"], "num_inference_steps": 3, "seed": [1, 2],
            "output_type": "np_float"}
    # The same graph on one thread per slice or on every thread at once: float summation order only.
    np.testing.assert_allclose(rows(**args).images, threads(**args).images, rtol=0, atol=1e-5)
