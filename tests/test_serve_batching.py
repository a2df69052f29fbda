"""Dynamic batching gives every request its own pixels; the queue is bounded; deadlines and disconnects cancel."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fakes.serving import HeldPipeline, SlowPipeline, pixels, serving, until
from sdexport.runtime.args import GenerationArgs
from sdexport.serve.app import create_app
from sdexport.serve.config import ServeConfig
from sdexport.serve.merge import Share, batch_key, merged_args, split_result

STEPS = 3
LONG = 500
"""Denoising steps of a request that only ends by being cancelled (SlowPipeline: at least 5 s)."""


@pytest.fixture(scope="module")
def pipe(tiny_pipe: Callable[[str], Any]) -> Any:
    return tiny_pipe("tiny-sd15")


def _cancelled_batches(app: Any) -> float:
    return app.state.service.metrics.batches.labels("cancelled")._value.get()


REQUESTS = [  # (endpoint, body, the direct Pipeline call that must give the same pixels)
    ("/v1/generate", {"prompt": "a red circle", "negative_prompt": "blur", "seed": 1},
     {"prompt": "a red circle", "negative_prompt": "blur", "seed": 1}),
    ("/v1/generate", {"prompt": ["a blue square", "a green dot"], "negative_prompt": "noise", "seed": [5, 9]},
     {"prompt": ["a blue square", "a green dot"], "negative_prompt": "noise", "seed": [5, 9]}),
    ("/v1/images/generations", {"prompt": "a boat", "negative_prompt": "rain", "seed": 70, "n": 1},
     {"prompt": "a boat", "negative_prompt": "rain", "seed": 70}),
    ("/v1/generate", {"prompt": "a red circle", "negative_prompt": "blur", "seed": 1, "num_inference_steps": 2},
     {"prompt": "a red circle", "negative_prompt": "blur", "seed": 1, "num_inference_steps": 2}),
]


def _images(endpoint: str, body: dict[str, Any]) -> list[np.ndarray]:
    items = body["images"] if endpoint == "/v1/generate" else body["data"]
    return [pixels(item["b64_json"]) for item in items]


@pytest.mark.parametrize("max_batch", [4, 1], ids=["batching-on", "batching-off"])
def test_batched_requests_get_exactly_the_pixels_they_would_get_alone(pipe: Any, max_batch: int) -> None:
    held = HeldPipeline(pipe)
    app = create_app(held, ServeConfig(warmup_steps=0, max_batch=max_batch, batch_window_ms=0))
    common = {"num_inference_steps": STEPS, "scheduler": "euler_a"}  # stochastic: per-image noise every step

    async def go() -> list[Any]:
        async with serving(app) as client:
            blocker = asyncio.ensure_future(client.post("/v1/generate", json={"prompt": "x", "height": 32}))
            await until(lambda: len(app.state.service.batcher.running) == 1)  # the only worker is held
            calls = [asyncio.ensure_future(client.post(path, json={**common, **body})) for path, body, _ in REQUESTS]
            await until(lambda: app.state.service.batcher.depth == len(REQUESTS))
            held.release.set()
            await blocker
            return list(await asyncio.gather(*calls))

    answers = asyncio.run(go())
    batch_images = [a.json().get("batch_images") for a in answers[:2]]
    if max_batch == 4:  # the three compatible requests (4 images) ran as one batch; the 2-step one alone
        assert batch_images == [4, 4] and held.calls == 3
    else:
        assert batch_images == [1, 2] and held.calls == 1 + len(REQUESTS)
    for (path, _, direct), answer in zip(REQUESTS, answers, strict=True):
        assert answer.status_code == 200, answer.text
        alone = pipe(**{**common, **direct}, output_type="np").images
        got = _images(path, answer.json())
        assert len(got) == len(alone)
        for image, expected in zip(got, alone, strict=True):
            np.testing.assert_array_equal(image, expected)  # exact pixels, batched or not
    if max_batch == 4:
        params = answers[1].json()["parameters"]
        assert params["prompt"] == ["a blue square", "a green dot"] and params["seeds"] == [5, 9]
        assert params == json.loads(json.dumps(pipe(**{**common, **REQUESTS[1][2]}, output_type="latent").parameters))


def test_batch_key_separates_what_cannot_share_a_batch(pipe: Any, picture: Any) -> None:
    def key(**kwargs: Any) -> Any:
        args = GenerationArgs(**{"prompt": "a", "num_inference_steps": 4, **kwargs})
        return batch_key(args, pipe.validate(args)[0])

    assert key(seed=1, prompt="b") == key(seed=2, num_images_per_prompt=3)
    assert key(negative_prompt="x") == key(negative_prompt="y") != key()
    for other in ({"num_inference_steps": 5}, {"height": 32}, {"guidance_scale": 1.0}, {"scheduler": "ddim"},
                  {"scheduler_config": {"timestep_spacing": "trailing"}}, {"output_type": "latent"},
                  {"guidance_rescale": 0.5}):
        assert key(**other) != key(), other
    assert key(image=picture) is None  # pictures are per request: it runs alone


def test_queue_full_is_429_with_retry_after_and_queued_deadlines_never_run(pipe: Any) -> None:
    held = HeldPipeline(pipe)
    app = create_app(held, ServeConfig(warmup_steps=0, max_queue=1, batch_window_ms=0))
    body = {"prompt": "a", "num_inference_steps": STEPS}

    async def go() -> tuple[Any, ...]:
        async with serving(app) as client:
            running = asyncio.ensure_future(client.post("/v1/generate", json=body))
            await until(lambda: len(app.state.service.batcher.running) == 1)
            queued = asyncio.ensure_future(client.post("/v1/generate", json={**body, "timeout": 0.3}))
            await until(lambda: app.state.service.batcher.depth == 1)
            full = await client.post("/v1/images/generations", json={"prompt": "b"})
            expired = await queued  # its deadline passed while it waited
            after = asyncio.ensure_future(client.post("/v1/generate", json={**body, "height": 32}))
            await until(lambda: app.state.service.batcher.depth == 1)  # the queue had room again
            held.release.set()
            return full, expired, await running, await after

    full, expired, running, after = asyncio.run(go())
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert "queue is full" in full.json()["error"]["message"] and "--max-queue 1" in full.json()["error"]["message"]
    assert expired.status_code == 504 and "deadline of 0.3 s" in expired.json()["error"]["message"]
    assert running.status_code == 200 and after.status_code == 200
    assert held.calls == 2  # the expired request never reached the pipeline


def test_deadline_cancels_the_denoising_loop_with_504_and_frees_the_worker(pipe: Any) -> None:
    app = create_app(SlowPipeline(pipe), ServeConfig(warmup_steps=0, workers=1))

    async def go() -> tuple[Any, Any, float]:
        async with serving(app) as client:
            late = asyncio.ensure_future(client.post("/v1/generate", json={
                "prompt": "a", "num_inference_steps": LONG, "height": 32, "width": 32, "timeout": 1.0}))
            await until(lambda: len(app.state.service.batcher.running) == 1)
            t0 = time.perf_counter()
            await client.get("/healthz")  # answered while the worker thread generates
            health_s = time.perf_counter() - t0
            await until(lambda: _cancelled_batches(app) == 1)  # the loop stopped at its next step
            return await late, await client.post("/v1/generate", json={"prompt": "a", "num_inference_steps": STEPS}), \
                health_s

    late, next_one, health_s = asyncio.run(go())
    assert late.status_code == 504 and late.json()["error"]["type"] == "timeout"
    assert next_one.status_code == 200  # the only worker was free again
    assert health_s < 0.9  # the event loop was not blocked: the deadline (1 s) had not passed yet


def test_client_disconnect_cancels_the_request(pipe: Any) -> None:
    app = create_app(SlowPipeline(pipe), ServeConfig(warmup_steps=0))
    body = json.dumps({"prompt": "a", "num_inference_steps": LONG, "height": 32, "width": 32}).encode()
    sent: list[dict[str, Any]] = []

    async def go() -> None:
        async with serving(app):
            started = asyncio.Event()
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict[str, Any]:
                if messages:
                    return messages.pop()
                await until(lambda: len(app.state.service.batcher.running) == 1)
                started.set()
                return {"type": "http.disconnect"}  # the client went away while its batch ran

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/generate", "raw_path": b"/v1/generate", "query_string": b"",
                     "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                  (b"content-length", str(len(body)).encode())],
                     "client": ("127.0.0.1", 1), "server": ("testserver", 80), "state": {}}
            await asyncio.wait_for(app(scope, receive, send), timeout=30)
            assert started.is_set()
            await until(lambda: _cancelled_batches(app) == 1 and not app.state.service.batcher.running)

    asyncio.run(go())
    assert sent[0]["status"] == 499


def test_a_merged_sdxl_batch_keeps_every_requests_prompts_second_prompts_and_negatives(
        tiny_pipe: Callable[[str], Any]) -> None:
    sdxl = tiny_pipe("tiny-sdxl")
    requests = [{"prompt": "a", "prompt_2": "b", "negative_prompt": "c", "negative_prompt_2": "d", "seed": 1},
                {"prompt": "e", "negative_prompt": "g", "num_images_per_prompt": 2, "seed": 4},
                {"prompt": ["h"], "negative_prompt": ["i"], "seed": [8]}]  # 4 images: the folder's batch maximum
    common = {"num_inference_steps": STEPS, "output_type": "np", "scheduler": "euler_a"}
    shares = [Share(args, sdxl.validate(args)[0]) for args in (GenerationArgs(**r, **common) for r in requests)]
    assert len({batch_key(share.args, share.request) for share in shares}) == 1
    merged = merged_args(shares, None)
    assert merged.prompt == ["a", "e", "e", "h"] and merged.prompt_2 == ["b", "e", "e", "h"]
    assert merged.negative_prompt_2 == ["d", "g", "g", "i"] and merged.seed == [1, 4, 5, 8]
    for request, share in zip(requests, split_result(sdxl.generate(merged), shares), strict=True):
        alone = sdxl(**request, **common)
        np.testing.assert_array_equal(share.images, alone.images)  # exact pixels
        assert share.seeds == alone.seeds and share.parameters == alone.parameters
