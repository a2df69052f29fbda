"""Pre- and post-processing of images and masks, numerically as diffusers' VaeImageProcessor does it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

OUTPUT_TYPES = ("pil", "np", "np_float", "latent")
"""``pil``: list of PIL images; ``np``: uint8 [N, H, W, 3]; ``np_float``: float32 [N, H, W, 3] in [0, 1] (diffusers'
``output_type="np"``); ``latent``: the final latents float32 [N, 4, h, w] (not divided by the scaling factor)."""

ImageInput = Any
"""A PIL image, a numpy array (uint8 [H, W, 3] / [H, W], or float in [0, 1]), or latents [4, h, w] / [N, 4, h, w]."""


def image_size(image: ImageInput) -> tuple[int, int]:
    """(height, width) in pixels of a PIL image or an [H, W(, C)] array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ValueError(f"an image array must be [H, W] or [H, W, C]; got shape {list(array.shape)}")
    return int(array.shape[0]), int(array.shape[1])


def default_size(image: ImageInput, multiple: int) -> tuple[int, int]:
    """The image's size rounded down to a multiple of ``multiple`` (the size diffusers generates at by default)."""
    height, width = image_size(image)
    return height - height % multiple, width - width % multiple


def _to_pil(image: ImageInput, what: str) -> Image.Image | np.ndarray:
    """PIL images pass through; uint8 arrays become PIL images; float arrays in [0, 1] stay arrays."""
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"{what} must be a PIL image or an [H, W] / [H, W, 3] array; got shape {list(array.shape)}")
    if array.dtype == np.uint8:
        return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} array has dtype {array.dtype}; pass uint8 (0..255) or float (0..1)")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} float array has NaN or Inf values; expected finite values in [0, 1]")
    if array.size and (array.min() < 0 or array.max() > 1):
        raise ValueError(f"{what} float array has values in [{array.min():.3g}, {array.max():.3g}]; expected [0, 1]")
    return array.astype(np.float32)


def _resized(image: Image.Image | np.ndarray, height: int, width: int, what: str) -> Image.Image | np.ndarray:
    if isinstance(image, Image.Image):
        # diffusers' "default" resize mode: straight to (width, height), Lanczos; a no-op at the same size.
        return image.resize((width, height), resample=Image.Resampling.LANCZOS)
    if image.shape[:2] != (height, width):
        raise ValueError(
            f"{what} float array is {image.shape[0]}x{image.shape[1]}, the generation is {height}x{width}: resize it "
            f"first or pass a PIL image / uint8 array (resized with Lanczos like diffusers)"
        )
    return image


def preprocess_image(image: ImageInput, height: int, width: int, normalize: bool = True) -> np.ndarray:
    """An RGB image -> float32 [1, 3, height, width] in [-1, 1] ([0, 1] without ``normalize``: ControlNet images),
    resized with Lanczos when its size differs."""
    picture = _resized(_to_pil(image, "image"), height, width, "image")
    if isinstance(picture, Image.Image):
        array = np.asarray(picture.convert("RGB")).astype(np.float32) / 255.0
    else:
        array = picture if picture.ndim == 3 else picture[..., None]
        array = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[..., :3]
    if normalize:
        array = 2.0 * array - 1.0
    return array.transpose(2, 0, 1)[None].astype(np.float32)


def preprocess_mask(mask: ImageInput, height: int, width: int) -> np.ndarray:
    """A mask -> float32 [1, 1, height, width] of 0 (keep) / 1 (repaint): resized, grayscale, binarised at 0.5."""
    picture = _resized(_to_pil(mask, "mask_image"), height, width, "mask_image")
    if isinstance(picture, Image.Image):
        array = np.asarray(picture.convert("L")).astype(np.float32) / 255.0
    else:
        array = picture if picture.ndim == 2 else picture[..., :3].mean(axis=2)
    return (array >= 0.5).astype(np.float32)[None, None]


def latent_mask(mask: np.ndarray, vae_scale_factor: int) -> np.ndarray:
    """Nearest-neighbour downsampling of a pixel mask to the latent grid (torch's interpolate default)."""
    return np.ascontiguousarray(mask[:, :, ::vae_scale_factor, ::vae_scale_factor])


def as_latents(image: ImageInput, channels: int) -> np.ndarray | None:
    """``image`` as float32 latents [N, channels, h, w] when it is a latent array, else None (a picture)."""
    if not isinstance(image, np.ndarray):
        return None
    array = image
    if array.ndim == 4 or (array.ndim == 3 and array.shape[0] == channels and array.shape[2] not in (1, 3, 4)):
        latents = array[None] if array.ndim == 3 else array
        if latents.shape[1] != channels:
            raise ValueError(f"latents passed as image must have {channels} channels: got shape {list(latents.shape)}")
        return latents.astype(np.float32)
    return None


def postprocess(decoded: np.ndarray, output_type: str) -> Any:
    """VAE output [N, 3, H, W] in about [-1, 1] -> ``output_type`` (see OUTPUT_TYPES)."""
    floats = np.clip(decoded * np.float32(0.5) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1)
    if output_type == "np_float":
        return np.ascontiguousarray(floats, dtype=np.float32)
    as_uint8 = (floats * np.float32(255)).round().astype(np.uint8)
    if output_type == "np":
        return as_uint8
    return [Image.fromarray(image) for image in as_uint8]


def save_png(image: Image.Image, path: str | Path, parameters: Mapping[str, Any]) -> Path:
    """Save a PNG with the generation parameters as JSON in its ``parameters`` text chunk."""
    return _write(image, Path(path), "PNG", parameters)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
"""Output suffix -> the format written (the parameters go in a PNG text chunk, a JPEG comment, WebP EXIF)."""
LATENT_SUFFIX = ".npy"


def check_output_path(path: str | Path) -> Path:
    """Refuse an output path whose suffix names no format, or whose folder cannot be created; return it."""
    path = Path(path)
    allowed = [*IMAGE_FORMATS, LATENT_SUFFIX]
    if path.suffix.lower() not in allowed:
        raise ValueError(f"output {str(path)!r}: the suffix {path.suffix!r} names no format this writes; "
                         f"use one of {allowed}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"output {str(path)!r}: cannot create its folder {str(path.parent)!r} "
                         f"({exc.strerror or exc}); choose a writable place") from exc
    if path.is_dir():
        raise ValueError(f"output {str(path)!r} is a directory; name a file in it")
    return path


def save_image(image: Image.Image, path: str | Path, parameters: Mapping[str, Any]) -> Path:
    """Save ``image`` in the format its suffix names (IMAGE_FORMATS), with the generation parameters as JSON."""
    path = check_output_path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"output {str(path)!r}: an image needs one of {list(IMAGE_FORMATS)}")
    return _write(image, path, fmt, parameters)


def _write(image: Image.Image, path: Path, fmt: str, parameters: Mapping[str, Any]) -> Path:
    """Write ``image`` as ``fmt`` with the parameters in the format's text field."""
    text = json.dumps(dict(parameters), sort_keys=True, default=str)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        options: dict[str, Any] = {"pnginfo": info}
    elif fmt == "JPEG":
        options = {"quality": 95, "comment": text.encode()}
    else:
        exif = Image.Exif()
        exif[0x010E] = text  # ImageDescription
        options = {"quality": 95, "exif": exif}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format=fmt, **options)
    except OSError as exc:
        raise ValueError(f"cannot write {str(path)!r}: {exc}") from exc
    return path


def broadcast(items: Sequence[Any], count: int, what: str) -> list[Any]:
    """One item, or exactly ``count`` items (one per prompt), as a list of ``count``."""
    if len(items) == 1:
        return list(items) * count
    if len(items) != count:
        raise ValueError(f"{what}: got {len(items)}; pass one, or one per prompt ({count})")
    return list(items)
