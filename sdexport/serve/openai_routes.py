"""OpenAI-compatible endpoints: ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart)."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from pydantic import ValidationError as PydanticError
from starlette.datastructures import UploadFile

from sdexport.runtime.args import GenerationArgs
from sdexport.serve.answers import openai_answer
from sdexport.serve.codec import edit_mask, read_picture
from sdexport.serve.errors import ApiError, describe_errors
from sdexport.serve.schemas import (
    EDIT_EXTRAS,
    OPENAI_EXTRAS,
    EditsRequest,
    ErrorResponse,
    ImagesRequest,
    ImagesResponse,
)
from sdexport.serve.service import Service

router = APIRouter(tags=["OpenAI images"])
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 429,
                                                                                     503, 504)}
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def service_of(request: Request) -> Service:
    """The app's service once it is loaded and warm; 503 with Retry-After before."""
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        state = "shutting down" if service is not None and service.draining else "loading and warming up"
        raise ApiError(503, f"the server is {state}; see GET /readyz", headers={"Retry-After": "5"})
    return service


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's ``WIDTHxHEIGHT`` (or auto / None: the folder's optimum) -> (height, width)."""
    if size is None or size == "auto":
        return None, None
    match = _SIZE.match(size)
    if not match:
        raise ApiError(422, f"size={size!r} is not allowed: pass WIDTHxHEIGHT like 512x512, or auto", "size")
    width, height = int(match.group(1)), int(match.group(2))
    return height, width


def openai_args(body: BaseModel, extras: tuple[str, ...], service: Service, **pictures: Any) -> GenerationArgs:
    """GenerationArgs of an OpenAI-style body: prompt, n, size, then sdexport's fields that were given."""
    fields: dict[str, Any] = body.model_dump()
    if fields["response_format"] == "url":
        raise ApiError(400, "response_format='url' is not supported: this server stores nothing; use "
                       "response_format='b64_json'", "response_format")
    n = fields["n"]
    if isinstance(n, bool) or not 1 <= n <= service.max_n:
        raise ApiError(422, f"n={n!r} is out of range; allowed: 1..{service.max_n} (--max-n, capped by the "
                       "folder's batch range)", "n")
    height, width = parse_size(fields["size"])
    given = {name: fields[name] for name in extras if fields.get(name) is not None}
    return GenerationArgs(prompt=fields["prompt"], num_images_per_prompt=n, height=height, width=width,
                          **given, **pictures)


def _validate(service: Service, args: GenerationArgs, size: str | None) -> Any:
    try:
        return service.validate(args)
    except ApiError as exc:
        if exc.param in ("height", "width") and size is not None:
            raise ApiError(422, f"size={size!r}: {exc.message}", "size") from exc
        raise


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=ERRORS,
             summary="Create images (OpenAI-compatible)")
async def generations(body: ImagesRequest, request: Request) -> dict[str, Any]:
    """Text to image, OpenAI's request shape plus sdexport's optional fields; b64_json answers only."""
    service = service_of(request)
    share = _validate(service, openai_args(body, OPENAI_EXTRAS, service), body.size)
    outcome = await service.run(share, body.timeout, request)
    return await openai_answer(outcome)


_EDITS_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "prompt"],
    "properties": {"image": {"type": "string", "format": "binary"},
                   "mask": {"type": "string", "format": "binary", "description": "transparent (alpha 0) pixels "
                            "are repainted; a mask without alpha: white is repainted"},
                   **EditsRequest.model_json_schema()["properties"]}}}}}}


async def _form_fields(request: Request) -> tuple[dict[str, Any], UploadFile, UploadFile | None]:
    form = await request.form(max_files=2, max_fields=64)
    files = {k: v for k, v in form.multi_items() if isinstance(v, UploadFile)}
    image = files.get("image") or files.get("image[]")
    if image is None:
        raise ApiError(422, "image: a picture file is required (multipart field 'image')", "image")
    fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
    if isinstance(fields.get("scheduler_config"), str):
        try:
            fields["scheduler_config"] = json.loads(fields["scheduler_config"])
        except json.JSONDecodeError as exc:
            raise ApiError(422, f"scheduler_config: not a JSON object: {exc}", "scheduler_config") from exc
    return fields, image, files.get("mask")


@router.post("/v1/images/edits", response_model=ImagesResponse, responses=ERRORS, openapi_extra=_EDITS_BODY,
             summary="Edit an image (OpenAI-compatible): image-to-image, or inpainting with a mask")
async def edits(request: Request) -> dict[str, Any]:
    """Multipart image (+ mask: inpainting, else image-to-image), prompt, n, size and sdexport's fields."""
    service = service_of(request)
    fields, image, mask = await _form_fields(request)
    try:
        body = EditsRequest.model_validate(fields)
    except PydanticError as exc:
        message, field = describe_errors(exc.errors())
        raise ApiError(422, message, field) from exc
    cap = service.config.max_image_pixels
    picture = read_picture(await image.read(), "image", cap).convert("RGB")
    pictures: dict[str, Any] = {"image": picture}
    if mask is not None:
        pictures["mask_image"] = edit_mask(read_picture(await mask.read(), "mask", cap))
    args = openai_args(body, EDIT_EXTRAS, service, **pictures)
    share = _validate(service, args, body.size)
    outcome = await service.run(share, body.timeout, request)
    return await openai_answer(outcome)
