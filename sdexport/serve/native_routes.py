"""The native endpoint ``POST /v1/generate``: every argument of ``Pipeline.__call__``; JSON or server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from sdexport.runtime.args import GenerationArgs
from sdexport.serve.answers import native_answer
from sdexport.serve.codec import b64decode, read_latents, read_picture
from sdexport.serve.errors import ApiError, error_body
from sdexport.serve.merge import Share
from sdexport.serve.openai_routes import ERRORS, service_of
from sdexport.serve.schemas import PICTURES, GenerateRequest, GenerateResponse
from sdexport.serve.service import Service

router = APIRouter(tags=["sdexport"])
SERVER_FIELDS = ("timeout", "stream")


def native_args(body: BaseModel, max_pixels: int) -> GenerationArgs:
    """GenerationArgs from the native body: pictures and latents decoded from base64, nothing read from disk."""
    fields = {k: v for k, v in body.model_dump().items() if k not in SERVER_FIELDS}
    for name in PICTURES:
        if fields.get(name) is not None:
            data = b64decode(fields[name], name)
            fields[name] = read_latents(data, name) if name == "latents" else read_picture(data, name, max_pixels)
    return GenerationArgs(**fields)


def _event(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def _stream(service: Service, share: Share, timeout: float | None, request_id: str) -> AsyncIterator[bytes]:
    """queued, one step event per denoising step, then result (or error); cancelled if the client goes away."""
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

    def progress(index: int, total: int) -> None:
        loop.call_soon_threadsafe(steps.put_nowait, (index, total))

    task = asyncio.ensure_future(service.run(share, timeout, None, progress))
    yield _event("queued", {"id": request_id, "queue_depth": service.batcher.depth})
    try:
        while not task.done() or not steps.empty():
            getter = asyncio.ensure_future(steps.get())
            await asyncio.wait([getter, task], return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                index, total = getter.result()
                yield _event("step", {"step": index + 1, "num_steps": total})
            else:
                getter.cancel()
        try:
            yield _event("result", await native_answer(task.result(), request_id))
        except ApiError as exc:
            yield _event("error", error_body(exc.status, exc.message, exc.param))
    finally:
        task.cancel()


@router.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS,
             summary="Generate with every Pipeline argument; stream=true answers with server-sent events")
async def generate(body: GenerateRequest, request: Request) -> Any:
    """Native generation: seeds, timings and the PNG parameters in the answer; SSE progress with stream=true."""
    service = service_of(request)
    share = service.validate(native_args(body, service.config.max_image_pixels))
    request_id = request.state.request_id
    if body.stream:
        return StreamingResponse(_stream(service, share, body.timeout, request_id),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-store"})
    outcome = await service.run(share, body.timeout, request)
    return await native_answer(outcome, request_id)
