"""Bytes in and out: uploaded pictures (with size caps) and latents, generated images as base64 PNG or .npy."""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sdexport.serve.errors import ApiError


def b64decode(text: str, name: str) -> bytes:
    """Base64 (optionally a ``data:...;base64,`` URL) -> bytes; ApiError 422 naming the field otherwise."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, f"{name}: not valid base64 ({exc})", name) from exc


def read_picture(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """A PNG / JPEG / WebP picture from bytes, refused before decoding when over ``max_pixels`` (422)."""
    try:
        picture = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as exc:
        raise ApiError(422, f"{name}: not a picture Pillow can read (PNG, JPEG, WebP): {exc}", name) from exc
    width, height = picture.size
    if width * height > max_pixels:
        raise ApiError(422, f"{name} is {width}x{height} = {width * height} pixels; the server accepts at most "
                       f"{max_pixels} pixels (--max-image-pixels)", name)
    try:
        picture.load()
    except (OSError, ValueError) as exc:
        raise ApiError(422, f"{name}: the picture is truncated or corrupt: {exc}", name) from exc
    return picture


def edit_mask(mask: Image.Image) -> Image.Image:
    """An OpenAI edit mask (transparent = edit) -> sdexport's (white = repaint); a mask without alpha is kept."""
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L")
    return mask.convert("L")


def read_latents(data: bytes, name: str) -> np.ndarray:
    """A float array from .npy bytes (no pickles); ApiError 422 otherwise."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ApiError(422, f"{name}: not a .npy array file: {exc}", name) from exc
    if not np.issubdtype(array.dtype, np.floating):
        raise ApiError(422, f"{name}: the array has dtype {array.dtype}; pass float32 latents", name)
    return array


def png_bytes(image: Image.Image, parameters: Mapping[str, Any] | None = None) -> bytes:
    """A PNG with the generation parameters as JSON in its ``parameters`` text chunk (as ``sdexport run``)."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", json.dumps(dict(parameters), sort_keys=True, default=str))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as .npy file bytes."""
    out = io.BytesIO()
    np.save(out, np.asarray(array), allow_pickle=False)
    return out.getvalue()


def b64(data: bytes) -> str:
    """Bytes as base64 text."""
    return base64.b64encode(data).decode("ascii")


def encode_image(image: Any, parameters: Mapping[str, Any] | None, seed: int) -> tuple[str, str]:
    """(format, base64) of one output image: a PIL image as PNG with its parameters and seed, an array as .npy."""
    if isinstance(image, Image.Image):
        meta = None if parameters is None else {**{k: v for k, v in parameters.items() if k != "seeds"},
                                                "seed": seed}
        return "png", b64(png_bytes(image, meta))
    return "npy", b64(npy_bytes(image))
