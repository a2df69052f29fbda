"""Request and response bodies: the OpenAI images shape and the native one, derived from ``GenerationArgs``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from sdexport.runtime.args import arg_info, arg_types, defaults

SERVER_ONLY = ("callback",)
"""GenerationArgs fields a request cannot set (the server drives the step callback itself)."""
PICTURES = ("image", "mask_image", "latents")
"""GenerationArgs fields that arrive base64-encoded (PNG / JPEG pictures; latents as a .npy file)."""
OPENAI_EXTRAS = ("negative_prompt", "num_inference_steps", "guidance_scale", "guidance_rescale", "scheduler",
                 "scheduler_config", "eta", "clip_skip", "seed", "rng", "long_prompts")
"""sdexport's own optional fields accepted next to the OpenAI ones (None: the library's default)."""
EDIT_EXTRAS = (*OPENAI_EXTRAS, "strength")
OPENAI_IGNORED = ("model", "quality", "style", "user")
"""OpenAI fields accepted for client compatibility; the folder decides the model, the rest does not apply."""
TIMEOUT_HELP = "seconds before the request is cancelled (queue + generation; at most the server's --timeout-s)"


def _strict() -> ConfigDict:
    return ConfigDict(extra="forbid")


def _field(name: str, optional: bool) -> tuple[Any, Any]:
    """(type, Field) of the generation argument ``name``: its type, help and default (None when ``optional``)."""
    info = arg_info(name)
    kind: Any = str | None if name in PICTURES else arg_types()[name]
    help_text = info.help + (" (base64 .npy)" if name == "latents" else " (base64)" if name in PICTURES else "")
    if info.choices and not info.registry:
        help_text += f"; one of {list(info.choices)}"
    default = defaults().get(name, ...)
    if optional:
        return kind | None, Field(None, description=help_text)
    return kind, Field(default, description=help_text)


def _native_fields() -> dict[str, Any]:
    fields = {name: _field(name, optional=False) for name in arg_types() if name not in SERVER_ONLY}
    fields["timeout"] = (float | None, Field(None, gt=0, description=TIMEOUT_HELP))
    fields["stream"] = (bool, Field(False, description="answer with server-sent events: queued, step ..., result"))
    return fields


def _openai_fields(extras: tuple[str, ...]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "prompt": (str, Field(..., min_length=1, description="the prompt")),
        "n": (int, Field(1, description="images to generate (at most the server's --max-n)")),
        "size": (str | None, Field(None, description="WIDTHxHEIGHT like 512x512, or auto (the folder's optimum)")),
        "response_format": (Literal["b64_json", "url"], Field("b64_json", description="b64_json only: the "
                            "server stores nothing, so url is refused with 400")),
        "timeout": (float | None, Field(None, gt=0, description=TIMEOUT_HELP)),
    }
    fields.update({name: (str | None, Field(None, description="accepted for OpenAI clients; not used"))
                   for name in OPENAI_IGNORED})
    fields.update({name: _field(name, optional=True) for name in extras})
    return fields


GenerateRequest: type[BaseModel] = create_model(
    "GenerateRequest", __config__=_strict(), __doc__="Every argument of Pipeline.__call__, plus timeout and stream.",
    **_native_fields())
ImagesRequest: type[BaseModel] = create_model(
    "ImagesRequest", __config__=_strict(), __doc__="OpenAI's images/generations body plus sdexport's own fields.",
    **_openai_fields(OPENAI_EXTRAS))
EditsRequest: type[BaseModel] = create_model(
    "EditsRequest", __config__=_strict(), __doc__="The text fields of OpenAI's images/edits form plus sdexport's.",
    **_openai_fields(EDIT_EXTRAS))


class ImageData(BaseModel):
    """One image of an OpenAI-style answer."""

    b64_json: str


class ImagesResponse(BaseModel):
    """OpenAI's images answer: creation time and one entry per image."""

    created: int
    data: list[ImageData]


class NativeImage(BaseModel):
    """One image of a native answer: PNG (output_type pil) or .npy (other output types), base64, and its seed."""

    b64_json: str
    format: Literal["png", "npy"]
    seed: int


class GenerateResponse(BaseModel):
    """The native answer: images with their seeds, stage timings, the PNG parameters and how it was batched."""

    id: str
    created: int
    images: list[NativeImage]
    seeds: list[int]
    timings: dict[str, Any]
    parameters: dict[str, Any]
    batch_images: int = Field(description="images in the engine batch this request ran in")
    queue_seconds: float


class ErrorDetail(BaseModel):
    """What went wrong, OpenAI's error shape: message, type, the parameter at fault."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """An error answer."""

    error: ErrorDetail
