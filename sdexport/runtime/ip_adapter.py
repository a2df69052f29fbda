"""IP-Adapter image prompts at run time: CLIP preprocessing, the image encoder call, the UNet's image inputs.

Meanings follow diffusers: ``ip_adapter_image`` is one picture (or a list of one: one adapter), encoded once per
request; ``ip_adapter_scale`` is ``pipe.set_ip_adapter_scale``'s value (default 1.0). Under guidance the negative
rows get a zeros embedding, as diffusers' ``encode_image`` does. A folder built with an adapter and called without
an image runs the adapter's branch at scale 0, which adds exactly nothing: the plain model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from sdexport.runtime.args import GenerationArgs
from sdexport.runtime.backends import Runner
from sdexport.runtime.conditioning import Conditioning
from sdexport.runtime.result import RequestError
from sdexport.specs import ModelSpec
from sdexport.specs.ip_adapter import IMAGE_EMBEDS, IMAGE_ENCODER, SCALE, has_ip_adapter

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
SCALE_RANGE = (-10.0, 10.0)


def clip_pixels(picture: Any, preprocess: Mapping[str, Any]) -> np.ndarray:
    """A picture -> pixel_values [1, 3, S, S] as CLIPImageProcessor makes them: RGB, shortest side resized to S
    (bicubic), centre crop S x S, scaled to [0, 1], normalised by the CLIP mean and std."""
    if not isinstance(picture, Image.Image):
        array = np.asarray(picture)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise ValueError(f"ip_adapter_image must be a PIL image or a uint8 [H, W(, 3)] array; got "
                             f"{type(picture).__name__} {getattr(array, 'dtype', '')} {list(array.shape)}")
        picture = Image.fromarray(array)
    size = int(preprocess["size"])
    image = picture.convert("RGB")
    width, height = image.size
    ratio = size / min(width, height)
    new = (size, int(height * ratio)) if width <= height else (int(width * ratio), size)
    image = image.resize(new, RESAMPLE[preprocess.get("resample", "bicubic")])
    top, left = (new[1] - size) // 2, (new[0] - size) // 2
    pixels = np.asarray(image, dtype=np.float32)[top:top + size, left:left + size] * np.float32(1 / 255)
    mean = np.asarray(preprocess["mean"], np.float32)
    std = np.asarray(preprocess["std"], np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1)[None])


@dataclass(frozen=True)
class ImagePrompt:
    """A checked image prompt: the preprocessed picture (None: no image, scale 0) and the adapter scale."""

    pixels: np.ndarray | None
    scale: float


def image_prompt(spec: ModelSpec, manifest: Mapping[str, Any], args: GenerationArgs) -> ImagePrompt | None:
    """Check ``ip_adapter_image`` / ``ip_adapter_scale`` against the folder; None when it has no IP-Adapter."""
    picture, scale = args.ip_adapter_image, args.ip_adapter_scale
    if not has_ip_adapter(spec):
        if picture is not None:
            raise RequestError("ip_adapter_image needs a folder built with --ip-adapter; this one has no "
                               "IP-Adapter")
        return None
    ok = isinstance(scale, int | float) and not isinstance(scale, bool) and math.isfinite(scale)
    if not ok or not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        raise RequestError(f"ip_adapter_scale={scale!r} is out of range; allowed: {SCALE_RANGE[0]} <= "
                           f"ip_adapter_scale <= {SCALE_RANGE[1]} (1.0: diffusers' default, 0: ignore the image)")
    if picture is None:
        return ImagePrompt(None, 0.0)
    if isinstance(picture, list | tuple):
        if len(picture) != 1:
            raise RequestError(f"ip_adapter_image has {len(picture)} entries; this folder has one IP-Adapter: "
                               "pass one picture (or a list of one)")
        picture = picture[0]
    try:
        pixels = clip_pixels(picture, manifest["components"][IMAGE_ENCODER]["preprocess"])
    except (ValueError, TypeError, OSError) as exc:
        raise RequestError(f"ip_adapter_image: {exc}") from exc
    return ImagePrompt(pixels, float(scale))


@dataclass(frozen=True)
class ImageConditioning(Conditioning):
    """Text conditioning plus the UNet's image inputs: image_embeds [N, D] per image row and one scale for all."""

    image_embeds: np.ndarray | None = None
    scale: float = 0.0

    def feeds(self) -> dict[str, np.ndarray]:
        """The text feeds, then image_embeds (zeros on the negative rows) and ip_adapter_scale per row."""
        out = super().feeds()
        positive = np.ascontiguousarray(self.image_embeds, dtype=np.float32)
        out[IMAGE_EMBEDS] = np.concatenate([np.zeros_like(positive), positive]) if self.cfg else positive
        out[SCALE] = np.full(out[IMAGE_EMBEDS].shape[0], self.scale, np.float32)
        return out


def condition_on_image(cond: Conditioning, prompt: ImagePrompt, spec: ModelSpec,
                       encoder: Runner | None) -> ImageConditioning:
    """``cond`` with the image prompt's embeds repeated for every image row (zeros and scale 0 without an image)."""
    rows = cond.positive.hidden.shape[0]
    width = int(spec.components[IMAGE_ENCODER].outputs[0].dims[1])
    if prompt.pixels is None or encoder is None:
        embeds = np.zeros((rows, width), np.float32)
    else:
        embeds = np.repeat(encoder({"pixel_values": prompt.pixels})[IMAGE_EMBEDS], rows, axis=0)
    return ImageConditioning(cond.positive, cond.negative, embeds, prompt.scale)
