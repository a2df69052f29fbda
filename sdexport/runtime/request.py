"""Checking and normalising a generation request against the folder before any work (errors name the range)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdexport.runtime.conditioning import Prompts, SizeConditions
from sdexport.runtime.images import OUTPUT_TYPES, as_latents, broadcast, default_size
from sdexport.runtime.noise import RNGS, check_seeds
from sdexport.runtime.result import GenerationResult, RequestError
from sdexport.specs import ModelSpec, ShapeRanges

LONG_PROMPTS = ("truncate", "chunk")

@dataclass(frozen=True)
class Request:
    """A validated request. Images are per prompt; ``image_latents`` is set when latents were passed as image."""

    task: str
    prompts: Prompts
    per_prompt: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float
    strength: float | None
    denoising_start: float | None
    denoising_end: float | None
    eta: float
    seeds: list[int]
    rng: str
    latents: np.ndarray | None
    images: list[Any] | None
    image_latents: np.ndarray | None
    masks: list[Any] | None
    sizes: SizeConditions
    output_type: str

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance runs when guidance_scale > 1 (diffusers' rule)."""
        return self.guidance_scale > 1.0

    @property
    def num_images(self) -> int:
        """Images this request makes."""
        return self.prompts.count * self.per_prompt

    def latent_shape(self, channels: int, factor: int) -> tuple[int, int, int]:
        """[channels, h, w] of one image's latents."""
        return channels, self.height // factor, self.width // factor


def _fail(message: str) -> RequestError:
    return RequestError(message)


def _texts(value: Any, name: str, count: int | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not items or not all(isinstance(t, str) for t in items):
        raise _fail(f"{name} must be a string or a non-empty list of strings; got {value!r}")
    if count is not None:
        try:
            return tuple(broadcast(list(items), count, name))
        except ValueError as exc:
            raise _fail(str(exc)) from exc
    return tuple(items)


def _number(value: Any, name: str, low: float, high: float, *, open_low: bool = False,
            open_high: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        raise _fail(f"{name}={value!r} is out of range; allowed: {low} {'<' if open_low else '<='} {name} "
                    f"{'<' if open_high else '<='} {high}")
    return float(value)


def _int(value: Any, name: str, low: int, high: int, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
        raise _fail(f"{name}={value!r} is out of range; allowed: integers {low}..{high}{what}")
    return int(value)


def _pair(value: Any, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, Sequence) or len(value) != 2 or not all(isinstance(v, int | np.integer) for v in value):
        raise _fail(f"{name} must be a pair of integers (height, width) / (top, left); got {value!r}")
    return int(value[0]), int(value[1])


def _size(value: int, name: str, allowed: Sequence[int], factor: int) -> int:
    lo, _, hi = allowed
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value % factor or not lo <= value <= hi:
        raise _fail(f"{name}={value!r} is not allowed: this folder was built for {name} {lo}..{hi} px in "
                    f"multiples of {factor} (build range {tuple(allowed)})")
    return int(value)


def _per_prompt(value: Any, count: int, name: str) -> list[Any]:
    """One picture, or a list of one / one per prompt, as a list with one per prompt."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    try:
        return broadcast(items, count, name)
    except ValueError as exc:
        raise _fail(str(exc)) from exc


def _image_inputs(image: Any, count: int, channels: int) -> tuple[list[Any] | None, np.ndarray | None]:
    """(pictures per prompt, or latents [n, c, h, w]) from the ``image`` argument."""
    if isinstance(image, GenerationResult):
        image = image.images
    latents = as_latents(image, channels)
    if latents is not None:
        return None, latents
    return _per_prompt(image, count, "image"), None


def _sizes(args: dict[str, Any]) -> SizeConditions:
    pairs = {k: _pair(args[k], k) for k in ("original_size", "crops_coords_top_left", "target_size",
                                            "negative_original_size", "negative_crops_coords_top_left",
                                            "negative_target_size")}
    pairs["crops_coords_top_left"] = pairs["crops_coords_top_left"] or (0, 0)
    scores = {k: _number(args[k], k, -1e4, 1e4) for k in ("aesthetic_score", "negative_aesthetic_score")}
    return SizeConditions(**pairs, **scores)


def task_of(image: Any, mask_image: Any) -> str:
    """txt2img, img2img or inpaint from which of image / mask_image are given."""
    if mask_image is not None:
        if image is None:
            raise _fail("mask_image needs an image to inpaint: pass image= as well")
        return "inpaint"
    return "img2img" if image is not None else "txt2img"


def _prompts(spec: ModelSpec, ranges: ShapeRanges, args: dict[str, Any]) -> Prompts:
    """Prompt texts per text encoder (prompt / prompt_2), negatives, clip_skip and the long-prompt mode."""
    encoders = len(spec.text_encoders)
    prompts = _texts(args["prompt"], "prompt", None)
    if prompts is None:
        raise _fail("prompt is required (a string or a list of strings)")
    count = len(prompts)
    second = [k for k in ("prompt_2", "negative_prompt_2") if args[k] is not None]
    if second and encoders < 2:
        raise _fail(f"{', '.join(second)} feed SDXL's second text encoder; this {spec.family} folder has one "
                    "text encoder: use prompt / negative_prompt")
    texts = (prompts, _texts(args["prompt_2"], "prompt_2", count) or prompts)[:encoders]
    negatives = _texts(args["negative_prompt"], "negative_prompt", count)
    negative_texts = None
    if negatives is not None or args["negative_prompt_2"] is not None:
        negatives = negatives or ("",) * count
        negative_2 = _texts(args["negative_prompt_2"], "negative_prompt_2", count) or negatives
        negative_texts = (negatives, negative_2)[:encoders]
    clip_skip = 0 if args["clip_skip"] is None else _int(args["clip_skip"], "clip_skip", 0, spec.clip_skip_max,
                                                            " (or None) for this folder")
    if args["long_prompts"] not in LONG_PROMPTS:
        raise _fail(f"long_prompts={args['long_prompts']!r} is not one of {LONG_PROMPTS}")
    chunks = ranges.prompt_chunks if args["long_prompts"] == "chunk" else None
    return Prompts(texts, negative_texts, clip_skip, chunks)


@dataclass(frozen=True)
class _Pictures:
    images: list[Any] | None
    image_latents: np.ndarray | None
    masks: list[Any] | None
    height: int
    width: int


def _pictures(spec: ModelSpec, ranges: ShapeRanges, task: str, count: int, num_images: int,
              args: dict[str, Any]) -> _Pictures:
    """Input pictures / latents / masks, and the generation size (default: the picture's, else the folder's opt)."""
    factor, channels = spec.vae_scale_factor, spec.latent_channels
    images = image_latents = masks = None
    height, width = args["height"], args["width"]
    if task != "txt2img":
        images, image_latents = _image_inputs(args["image"], count, channels)
        if image_latents is not None:
            source = args["image"]
            if isinstance(source, GenerationResult) and source.latent_space != latent_space(spec):
                raise _fail(f"these latents come from a folder with latent space {source.latent_space} (scaling "
                            f"factor, VAE factor, channels); this {spec.family} folder uses {latent_space(spec)}: "
                            "hand latents only between matching folders (SDXL base -> refiner)")
            if image_latents.shape[0] not in (1, count, num_images):
                raise _fail(f"image latents have batch {image_latents.shape[0]}; pass 1, one per prompt ({count}) "
                            f"or one per image ({num_images})")
            implied = (image_latents.shape[2] * factor, image_latents.shape[3] * factor)
            if (height, width) not in ((None, None), implied):
                raise _fail(f"height/width {height}x{width} differ from the latents' {implied[0]}x{implied[1]}")
            height, width = implied
        elif height is None or width is None:
            guess = default_size(images[0], factor)
            height, width = height or guess[0], width or guess[1]
    if task == "inpaint":
        if image_latents is not None and spec.inpaint:
            raise _fail("an inpainting UNet needs the masked picture: pass image= as a picture, not latents")
        masks = _per_prompt(args["mask_image"], count, "mask_image")
    height = _size(ranges.height[1] if height is None else height, "height", ranges.height, factor)
    width = _size(ranges.width[1] if width is None else width, "width", ranges.width, factor)
    return _Pictures(images, image_latents, masks, height, width)


def _schedule(task: str, default_strength: float | None,
              args: dict[str, Any]) -> tuple[int, float | None, float | None, float | None]:
    """(steps, strength, denoising_start, denoising_end) checked like the scheduler will use them."""
    steps = _int(args["num_inference_steps"], "num_inference_steps", 1, 10**6)
    strength = args["strength"]
    if task == "txt2img":
        for name in ("strength", "denoising_start"):
            if args[name] is not None:
                raise _fail(f"{name} applies to image-to-image and inpainting; pass image= or drop {name}")
    else:
        strength = _number(default_strength if strength is None else strength, "strength", 0.0, 1.0, open_low=True)
    start, end = (None if args[k] is None else _number(args[k], k, 0.0, 1.0, open_low=True, open_high=True)
                  for k in ("denoising_start", "denoising_end"))
    if start is not None and end is not None and start >= end:
        raise _fail(f"denoising_start={start} must be smaller than denoising_end={end}")
    return steps, strength, start, end


def _latents(task: str, latents: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if latents is None:
        return None
    if task == "img2img":
        raise _fail("latents= is the initial noise of text-to-image and inpainting; image-to-image starts from "
                    "image= (pass latents there to continue from them)")
    array = np.asarray(latents, dtype=np.float32)
    if array.shape != shape:
        raise _fail(f"latents have shape {list(array.shape)}; this request needs {list(shape)}")
    return array


def build_request(spec: ModelSpec, ranges: ShapeRanges, args: dict[str, Any]) -> Request:
    """Validate the keyword arguments of ``Pipeline.__call__`` (``args``) for this folder; raise RequestError."""
    task = task_of(args["image"], args["mask_image"])
    unsupported = spec.family_record.task_error(task)
    if unsupported:
        raise _fail(unsupported)
    if spec.inpaint and task != "inpaint":
        raise _fail("this is an inpainting folder (9-channel UNet): pass image= and mask_image=")
    defaults = spec.family_record.call_defaults[task]
    default_guidance, default_strength = defaults.guidance_scale, defaults.strength
    prompts = _prompts(spec, ranges, args)
    count = prompts.count
    per_prompt = _int(args["num_images_per_prompt"], "num_images_per_prompt", 1, ranges.batch[2])
    lo, _, hi = ranges.batch
    if not lo <= count * per_prompt <= hi:
        raise _fail(f"{count} prompt(s) x num_images_per_prompt={per_prompt} = {count * per_prompt} images; this "
                    f"folder was built for {lo}..{hi} images per call (batch range {tuple(ranges.batch)})")
    num_images = count * per_prompt
    pictures = _pictures(spec, ranges, task, count, num_images, args)
    steps, strength, start, end = _schedule(task, default_strength, args)
    guidance = _number(default_guidance if args["guidance_scale"] is None else args["guidance_scale"],
                       "guidance_scale", 0.0, 1e4)
    rescale = _number(args["guidance_rescale"], "guidance_rescale", 0.0, 1.0)
    factor = spec.vae_scale_factor
    latents = _latents(task, args["latents"], (num_images, spec.latent_channels, pictures.height // factor,
                                               pictures.width // factor))
    if args["output_type"] not in OUTPUT_TYPES:
        raise _fail(f"output_type={args['output_type']!r} is not one of {OUTPUT_TYPES}")
    if args["rng"] not in RNGS:
        raise _fail(f"rng={args['rng']!r} is not one of {RNGS}")
    try:
        seeds = check_seeds(args["seed"], num_images)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    return Request(task, prompts, per_prompt, pictures.height, pictures.width, steps, guidance, rescale, strength,
                   start, end, float(args["eta"]), seeds, args["rng"], latents, pictures.images,
                   pictures.image_latents, pictures.masks, _sizes(args), args["output_type"])


def latent_space(spec: ModelSpec) -> tuple[float, int, int]:
    """(scaling_factor, vae_scale_factor, latent channels): what decides whether latents can move between folders."""
    return spec.scaling_factor, spec.vae_scale_factor, spec.latent_channels
