"""The same app as a Ray Serve deployment on a local Ray instance (opt-in: ``pytest -m ray``; needs sdexport[ray])."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fakes.ray_local import local_ray
from fakes.serving import free_port, pixels, wait_ready
from sdexport.serve.config import ServeConfig
from sdexport.serve.ray_serve import ReplicaPlan, build_deployment

pytestmark = pytest.mark.ray

@pytest.fixture(scope="module")
def ray_instance() -> Iterator[Any]:
    """A fresh local Ray (never a leftover cluster) with 2 CPUs and 2 logical GPUs, Serve shut down at the end."""
    with local_ray() as ray:
        from ray import serve

        try:
            yield ray
        finally:
            serve.shutdown()


def test_ray_serve_runs_one_replica_per_gpu_with_the_same_images(ray_instance: Any,
                                                                 tiny_folder: Callable[[str], Path],
                                                                 tiny_pipe: Callable[[str], Any]) -> None:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Fractional CPUs: replicas taking every CPU of a 2-CPU cluster would starve Ray's own tasks.
    plan = ReplicaPlan(num_replicas=2, num_gpus=1, num_cpus=0.5)
    serve.run(build_deployment(tiny_folder("tiny-sd15"), ServeConfig(warmup_steps=1), plan), name="sdexport",
              route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, timeout=120)
    assert ray_instance.available_resources().get("GPU", 0) == 0  # each replica holds one of the two GPUs
    status = serve.status().applications["sdexport"].deployments["sdexport"]
    assert status.replica_states.get("RUNNING") == 2, status
    body = {"prompt": "a lighthouse", "n": 2, "size": "64x64", "seed": 7, "num_inference_steps": 3}
    answers = [httpx.post(f"{base}/v1/images/generations", json=body, timeout=120) for _ in range(4)]
    alone = tiny_pipe("tiny-sd15")("a lighthouse", num_images_per_prompt=2, seed=7, num_inference_steps=3,
                                   output_type="np").images
    for answer in answers:  # spread over both replicas: every one gives the same pixels
        assert answer.status_code == 200, answer.text
        for item, expected in zip(answer.json()["data"], alone, strict=True):
            np.testing.assert_array_equal(pixels(item["b64_json"]), expected)
    assert httpx.post(f"{base}/v1/generate", json={"prompt": "a", "n": 1}, timeout=60).status_code == 422
