"""Turning finished requests into answers: base64 images (encoded off the event loop) in both API shapes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sdexport.serve.codec import encode_image
from sdexport.serve.service import Outcome


def _encoded(outcome: Outcome) -> list[tuple[str, str]]:
    result = outcome.result
    return [encode_image(image, result.parameters, seed)
            for image, seed in zip(result.images, result.seeds, strict=True)]


async def encoded(outcome: Outcome) -> list[tuple[str, str]]:
    """(format, base64) per image, encoded in a thread so the event loop keeps serving."""
    return await asyncio.to_thread(_encoded, outcome)


async def openai_answer(outcome: Outcome) -> dict[str, Any]:
    """OpenAI's images answer."""
    return {"created": int(time.time()), "data": [{"b64_json": data} for _, data in await encoded(outcome)]}


async def native_answer(outcome: Outcome, request_id: str) -> dict[str, Any]:
    """The native answer: images with seeds, timings, parameters, batch size and queue wait."""
    result = outcome.result
    images = [{"b64_json": data, "format": kind, "seed": seed}
              for (kind, data), seed in zip(await encoded(outcome), result.seeds, strict=True)]
    return {"id": request_id, "created": int(time.time()), "images": images, "seeds": list(result.seeds),
            "timings": result.timings.to_dict(), "parameters": result.parameters,
            "batch_images": outcome.batch_images, "queue_seconds": outcome.queue_seconds}
