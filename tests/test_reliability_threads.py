"""Eight threads on one Pipeline get, bit for bit, the results they get one after the other."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from sdexport.runtime.pipeline import Pipeline

SCHEDULERS = (None, "euler_a", "dpmpp_2m", "heun", "ddim", "dpmpp_2m_sde", "lms", "unipc")


def test_eight_threads_equal_sequential_bit_for_bit(tiny_pipe: Callable[[str], Pipeline]) -> None:
    pipe = tiny_pipe("tiny-sd15")
    jobs = [dict(prompt=f"prompt {i}", seed=10 + i, num_inference_steps=3, scheduler=s, output_type="np",
                 guidance_scale=7.5 if i % 2 else 1.0) for i, s in enumerate(SCHEDULERS)]
    alone = [pipe(**job).images for job in jobs]
    results: list[list[Any]] = [[] for _ in jobs]
    start = threading.Barrier(len(jobs))

    def work(index: int) -> None:
        start.wait()
        for _ in range(3):
            results[index].append(pipe(**jobs[index]).images)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, want in enumerate(alone):
        assert len(results[index]) == 3
        for got in results[index]:
            np.testing.assert_array_equal(got, want)
    assert len({a.tobytes() for a in alone}) == len(alone)  # distinct requests, distinct images
