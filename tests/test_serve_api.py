"""The serve endpoints in process: OpenAI shapes, native generation, SSE, errors, auth, limits, metrics, readiness."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fakes.serving import HeldPipeline, pixels, png_b64, serving, until
from sdexport.runtime.args import GenerationArgs
from sdexport.runtime.result import RequestError
from sdexport.serve.app import create_app
from sdexport.serve.config import ServeConfig

STEPS = 3
FAST = ServeConfig(warmup_steps=1, batch_window_ms=0)


@pytest.fixture(scope="module")
def pipe(tiny_pipe: Callable[[str], Any]) -> Any:
    return tiny_pipe("tiny-sd15")


def test_openai_generations_equal_direct_pipeline_calls(pipe: Any) -> None:
    async def go() -> Any:
        async with serving(create_app(pipe, FAST)) as client:
            return await client.post("/v1/images/generations", json={
                "prompt": "a lighthouse", "n": 2, "size": "64x48", "response_format": "b64_json", "seed": 7,
                "num_inference_steps": STEPS, "negative_prompt": "fog", "guidance_scale": 6.0})

    answer = asyncio.run(go())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"created", "data"} and len(body["data"]) == 2
    alone = pipe("a lighthouse", negative_prompt="fog", num_images_per_prompt=2, height=48, width=64, seed=7,
                 num_inference_steps=STEPS, guidance_scale=6.0, output_type="np")
    for item, expected in zip(body["data"], alone.images, strict=True):
        np.testing.assert_array_equal(pixels(item["b64_json"]), expected)  # exact: same seeds, same batch


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"])
def test_a_json_body_sent_as_curl_does_is_read_as_json(pipe: Any, content_type: str | None) -> None:
    """``curl URL -d '{...}'`` sends the JSON with curl's form Content-Type (or none): it is still a request."""
    body = json.dumps({"prompt": "a lighthouse", "size": "64x64", "seed": 7, "num_inference_steps": STEPS})
    headers = {"content-type": content_type} if content_type else {}

    async def go() -> Any:
        async with serving(create_app(pipe, FAST)) as client:
            return await client.post("/v1/images/generations", content=body.encode(), headers=headers)

    answer = asyncio.run(go())
    assert answer.status_code == 200, answer.text
    alone = pipe("a lighthouse", height=64, width=64, seed=7, num_inference_steps=STEPS, output_type="np")
    np.testing.assert_array_equal(pixels(answer.json()["data"][0]["b64_json"]), alone.images[0])


def test_the_openai_client_library_is_accepted(pipe: Any) -> None:
    openai = pytest.importorskip("openai")
    import httpx

    async def go() -> Any:
        app = create_app(pipe, FAST)
        async with serving(app):
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
            client = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
            return await client.images.generate(prompt="a cat", model="sdexport", n=1, size="64x64",
                                                 response_format="b64_json",
                                                 extra_body={"seed": 3, "num_inference_steps": STEPS})

    result = asyncio.run(go())
    alone = pipe("a cat", seed=3, num_inference_steps=STEPS, output_type="np")
    np.testing.assert_array_equal(pixels(result.data[0].b64_json), alone.images[0])


def test_native_generate_returns_seeds_timings_parameters_and_latents(pipe: Any) -> None:
    async def go() -> tuple[Any, Any]:
        async with serving(create_app(pipe, FAST)) as client:
            png = await client.post("/v1/generate", json={"prompt": ["a", "b"], "seed": [11, 4],
                                                           "num_inference_steps": STEPS, "scheduler": "euler_a"},
                                    headers={"X-Request-ID": "req-1"})
            latent = await client.post("/v1/generate", json={"prompt": "a", "seed": 2, "output_type": "latent",
                                                              "num_inference_steps": STEPS})
            return png, latent

    png, latent = asyncio.run(go())
    assert png.status_code == 200, png.text
    body = png.json()
    alone = pipe(["a", "b"], seed=[11, 4], num_inference_steps=STEPS, scheduler="euler_a", output_type="np")
    assert body["id"] == "req-1" and png.headers["x-request-id"] == "req-1"
    assert body["seeds"] == [11, 4] and [i["seed"] for i in body["images"]] == [11, 4]
    assert body["parameters"] == json.loads(json.dumps(alone.parameters))
    assert len(body["timings"]["unet"]) == len(alone.timings.unet) and body["timings"]["total"] > 0
    for item, expected in zip(body["images"], alone.images, strict=True):
        np.testing.assert_array_equal(pixels(item["b64_json"]), expected)
        stored = json.loads(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).info["parameters"])
        assert stored["seed"] == item["seed"] and stored["scheduler"] == alone.parameters["scheduler"]
    item = latent.json()["images"][0]
    assert item["format"] == "npy"
    array = np.load(io.BytesIO(base64.b64decode(item["b64_json"])))
    expected = pipe("a", seed=2, output_type="latent", num_inference_steps=STEPS).images[0]  # one file per image
    np.testing.assert_array_equal(array, expected)


def test_native_img2img_and_edits_equal_direct_calls(pipe: Any, picture: Image.Image) -> None:
    small = picture.resize((64, 64))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent square: repainted (OpenAI's mask convention)
    white_square = Image.new("L", (64, 64), 0)
    white_square.paste(255, (16, 16, 48, 48))

    async def go() -> tuple[Any, Any, Any]:
        async with serving(create_app(pipe, FAST)) as client:
            native = await client.post("/v1/generate", json={"prompt": "a", "image": png_b64(small), "seed": 5,
                                                              "strength": 0.6, "num_inference_steps": STEPS})
            files = {"image": ("in.png", base64.b64decode(png_b64(small)), "image/png")}
            edit = await client.post("/v1/images/edits", files=files, data={
                "prompt": "a", "seed": "5", "strength": "0.6", "num_inference_steps": str(STEPS)})
            files["mask"] = ("mask.png", base64.b64decode(png_b64(mask)), "image/png")
            inpaint = await client.post("/v1/images/edits", files=files, data={
                "prompt": "a", "seed": "5", "num_inference_steps": str(STEPS), "n": "2"})
            return native, edit, inpaint

    native, edit, inpaint = asyncio.run(go())
    img2img = pipe("a", image=small, seed=5, strength=0.6, num_inference_steps=STEPS, output_type="np").images[0]
    np.testing.assert_array_equal(pixels(native.json()["images"][0]["b64_json"]), img2img)
    np.testing.assert_array_equal(pixels(edit.json()["data"][0]["b64_json"]), img2img)
    assert inpaint.status_code == 200, inpaint.text
    expected = pipe("a", image=small, mask_image=white_square, seed=5, num_images_per_prompt=2,
                    num_inference_steps=STEPS, output_type="np").images
    for item, want in zip(inpaint.json()["data"], expected, strict=True):
        np.testing.assert_array_equal(pixels(item["b64_json"]), want)


def test_sse_variant_streams_every_step_then_the_result(pipe: Any) -> None:
    async def go() -> Any:
        async with serving(create_app(pipe, FAST)) as client:
            return await client.post("/v1/generate", json={"prompt": "a", "seed": 1, "num_inference_steps": STEPS,
                                                            "stream": True})

    answer = asyncio.run(go())
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
              for block in answer.text.strip().split("\n\n")]
    kinds = [kind for kind, _ in events]
    evaluations = len(pipe("a", seed=1, num_inference_steps=STEPS, output_type="latent").timings.unet)
    assert kinds == ["queued"] + ["step"] * evaluations + ["result"]
    assert [data["step"] for kind, data in events if kind == "step"] == list(range(1, evaluations + 1))
    alone = pipe("a", seed=1, num_inference_steps=STEPS, output_type="np").images[0]
    np.testing.assert_array_equal(pixels(events[-1][1]["images"][0]["b64_json"]), alone)


def _library_message(pipe: Any, **kwargs: Any) -> str:
    with pytest.raises(RequestError) as caught:
        pipe.validate(GenerationArgs(**kwargs))
    return str(caught.value)


BAD = [
    ("/v1/generate", {"prompt": "a", "colour": "red"}, 422, "colour", "unknown field"),
    ("/v1/generate", {"prompt": "a", "num_inference_steps": "many"}, 422, "num_inference_steps", "valid integer"),
    ("/v1/images/generations", {"prompt": "a", "size": "big"}, 422, "size", "WIDTHxHEIGHT"),
    ("/v1/images/generations", {"prompt": "a", "size": "4096x4096"}, 422, "size", "height=4096 is not allowed"),
    ("/v1/images/generations", {"prompt": "a", "n": 500}, 422, "n", "n=500 is out of range; allowed: 1..4"),
    ("/v1/images/generations", {"prompt": "a", "response_format": "url"}, 400, "response_format", "stores nothing"),
    ("/v1/images/generations", {"n": 1}, 422, "prompt", "Field required"),
    ("/v1/generate", {"prompt": "a", "image": "/etc/hostname"}, 422, "image", "not valid base64"),  # never a path
    ("/v1/generate", {"prompt": "a", "mask_image": "L2V0Yy9wYXNzd2Q="}, 422, "mask_image", "not a picture"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "text"), BAD, ids=[b[3] + "-" + str(b[2]) for b in BAD])
def test_bad_requests_name_the_field(pipe: Any, path: str, body: dict[str, Any], status: int, param: str,
                                     text: str) -> None:
    async def go() -> Any:
        async with serving(create_app(pipe, FAST)) as client:
            return await client.post(path, json=body)

    answer = asyncio.run(go())
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and text in error["message"], error


def test_library_errors_are_422_with_the_library_message_and_bad_json_is_400(pipe: Any) -> None:
    async def go() -> tuple[Any, Any, Any]:
        async with serving(create_app(pipe, ServeConfig(warmup_steps=1, max_body_bytes=2000))) as client:
            library = await client.post("/v1/generate", json={"prompt": "a", "guidance_rescale": 3.0})
            bad_json = await client.post("/v1/generate", content=b'{"prompt": ', headers={
                "content-type": "application/json"})
            huge = await client.post("/v1/generate", json={"prompt": "a" * 5000})
            return library, bad_json, huge

    library, bad_json, huge = asyncio.run(go())
    assert library.status_code == 422
    assert library.json()["error"]["message"] == _library_message(pipe, prompt="a", guidance_rescale=3.0)
    assert library.json()["error"]["param"] == "guidance_rescale"
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    assert huge.status_code == 413 and "2000 bytes" in huge.json()["error"]["message"]


def test_uploaded_pictures_over_the_pixel_cap_are_refused_before_decoding(pipe: Any) -> None:
    big = png_b64(Image.new("RGB", (300, 300)))

    async def go() -> Any:
        async with serving(create_app(pipe, ServeConfig(warmup_steps=1, max_image_pixels=256 * 256))) as client:
            return await client.post("/v1/generate", json={"prompt": "a", "image": big})

    answer = asyncio.run(go())
    assert answer.status_code == 422
    assert answer.json()["error"] == {"message": "image is 300x300 = 90000 pixels; the server accepts at most 65536 "
                                      "pixels (--max-image-pixels)", "type": "invalid_request_error",
                                      "param": "image", "code": "422"}


def test_auth_refuses_missing_and_wrong_tokens_before_anything_runs(pipe: Any, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="sdexport")
    held = HeldPipeline(pipe)
    held.release.set()
    body = {"prompt": "a", "num_inference_steps": STEPS}

    async def go() -> list[Any]:
        async with serving(create_app(held, ServeConfig(warmup_steps=0, api_key="s3cret"))) as client:
            return [await client.post("/v1/generate", json=body),
                    await client.post("/v1/generate", json=body, headers={"Authorization": "Bearer wrong"}),
                    await client.get("/metrics"),
                    await client.get("/healthz"),
                    await client.post("/v1/generate", json=body, headers={"Authorization": "Bearer s3cret"})]

    missing, wrong, metrics, health, right = asyncio.run(go())
    assert missing.status_code == wrong.status_code == metrics.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer" and "s3cret" not in wrong.text
    assert health.status_code == 200 and right.status_code == 200
    assert held.calls == 1  # only the authenticated request reached the pipeline
    assert "s3cret" not in caplog.text and "wrong" not in caplog.text  # keys are never logged
    access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "sdexport.serve.access"]
    assert [(line["path"], line["status"]) for line in access] == [
        ("/v1/generate", 401), ("/v1/generate", 401), ("/metrics", 401), ("/healthz", 200), ("/v1/generate", 200)]
    assert right.headers["x-request-id"] == access[-1]["request_id"]


def test_readyz_is_false_until_the_warm_up_finishes(pipe: Any) -> None:
    held = HeldPipeline(pipe)

    app = create_app(held, ServeConfig(warmup_steps=1))

    async def go() -> tuple[Any, ...]:
        async with serving(app, ready=False) as client:
            await until(lambda: held.calls == 1)  # the warm-up generation is running
            early = (await client.get("/readyz"), await client.post("/v1/generate", json={"prompt": "a"}),
                     await client.get("/healthz"))
            held.release.set()
            await until(lambda: app.state.service.ready)
            return (*early, await client.get("/readyz"))

    not_ready, refused, health, ready = asyncio.run(go())
    assert not_ready.status_code == 503 and not_ready.json()["state"] == "warming up"
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert health.status_code == 200
    assert ready.status_code == 200 and ready.json() == {"ready": True, "queue_depth": 0}


def test_metrics_count_requests_batches_and_stages(pipe: Any) -> None:
    async def go() -> str:
        async with serving(create_app(pipe, FAST)) as client:
            await client.post("/v1/generate", json={"prompt": "a", "num_inference_steps": STEPS})
            await client.post("/v1/generate", json={"prompt": "a", "bogus": 1})
            return (await client.get("/metrics")).text

    text = asyncio.run(go())
    assert 'sdexport_requests_total{endpoint="/v1/generate",status="200"} 1.0' in text
    assert 'sdexport_requests_total{endpoint="/v1/generate",status="422"} 1.0' in text
    assert "sdexport_queue_depth 0.0" in text
    assert "sdexport_batch_images_count 1.0" in text  # the request (the warm-up runs outside the batcher)
    for stage in ("queue", "text_encoder", "unet", "vae_decoder", "generate", "request"):
        assert f'sdexport_stage_seconds_count{{stage="{stage}"}}' in text
    assert "sdexport_images_per_second" in text and "sdexport_images_total 1.0" in text


def test_openapi_docs_list_every_endpoint(pipe: Any) -> None:
    async def go() -> tuple[Any, Any]:
        async with serving(create_app(pipe, FAST)) as client:
            return await client.get("/openapi.json"), await client.get("/docs")

    schema, docs = asyncio.run(go())
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert set(schema.json()["paths"]) == {"/v1/images/generations", "/v1/images/edits", "/v1/generate", "/healthz",
                                           "/readyz", "/metrics"}
