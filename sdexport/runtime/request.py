"""Checking and normalising a generation request against the folder before any work (errors name the range)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdexport.runtime.args import LONG_PROMPTS, GenerationArgs, check_callables, check_closed_sets
from sdexport.runtime.conditioning import Prompts, SizeConditions
from sdexport.runtime.images import as_latents, broadcast, default_size, preprocess_image, preprocess_mask
from sdexport.runtime.latent_files import TaggedLatents
from sdexport.runtime.noise import check_seeds
from sdexport.runtime.result import GenerationResult, RequestError
from sdexport.specs import ModelSpec, ShapeRanges

__all__ = ["LONG_PROMPTS", "Request", "build_request", "latent_space", "task_of"]

ChunksNeeded = Callable[[Prompts], int]
"""Chunks of 75 tokens the longest prompt needs (the conditioner's tokenizers count them; no engine runs)."""

@dataclass(frozen=True)
class Request:
    """A validated request. ``images`` / ``masks``: the pictures converted per prompt, float32 [prompts, 3, H, W] in
    [-1, 1] / [prompts, 1, H, W] of 0 (keep) and 1 (repaint); ``image_latents`` is set when latents were passed as
    image."""

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
    images: np.ndarray | None
    image_latents: np.ndarray | None
    masks: np.ndarray | None
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
    for text in items:
        _check_unicode(text, name)
    if count is not None:
        try:
            return tuple(broadcast(list(items), count, name))
        except ValueError as exc:
            raise _fail(str(exc)) from exc
    return tuple(items)


def _check_unicode(text: str, name: str) -> None:
    """Refuse text with lone surrogates: what undecodable command-line bytes become, and no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise _fail(f"{name} has a character that is not valid Unicode ({bad!r} at position {exc.start}, a lone "
                    "surrogate, as undecodable command-line bytes become): pass text encoded in UTF-8") from None


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
    try:
        latents = as_latents(image, channels)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    if latents is not None:
        return None, _finite(latents, "image (latents)")
    return _per_prompt(image, count, "image"), None


def _finite(array: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise _fail(f"{name} has NaN or Inf values; pass finite numbers")
    return array


def _convert(pictures: list[Any], name: str, convert: Callable[[Any, int, int], np.ndarray], height: int,
             width: int) -> np.ndarray:
    """Pictures (one per prompt, often the same object) -> their rows, each distinct object converted once."""
    rows: dict[int, np.ndarray] = {}
    try:
        for picture in pictures:
            if id(picture) not in rows:
                rows[id(picture)] = convert(picture, height, width)
    except (ValueError, TypeError, OSError) as exc:
        message = str(exc)
        source = getattr(picture, "filename", "")  # a PIL image opened from a file
        if isinstance(exc, OSError) and source:
            message = f"cannot decode {source!r} ({message}): the file is truncated or corrupt"
        raise _fail(message if message.startswith(name) else f"{name}: {message}") from exc
    return np.concatenate([rows[id(p)] for p in pictures])


def _sizes(args: GenerationArgs) -> SizeConditions:
    pairs = {k: _pair(getattr(args, k), k) for k in ("original_size", "crops_coords_top_left", "target_size",
                                            "negative_original_size", "negative_crops_coords_top_left",
                                            "negative_target_size")}
    pairs["crops_coords_top_left"] = pairs["crops_coords_top_left"] or (0, 0)
    scores = {k: _number(getattr(args, k), k, -1e4, 1e4) for k in ("aesthetic_score", "negative_aesthetic_score")}
    return SizeConditions(**pairs, **scores)


def task_of(image: Any, mask_image: Any) -> str:
    """txt2img, img2img or inpaint from which of image / mask_image are given."""
    if mask_image is not None:
        if image is None:
            raise _fail("mask_image needs an image to inpaint: pass image= as well")
        return "inpaint"
    return "img2img" if image is not None else "txt2img"


def _chunks(prompts: Prompts, limit: int, chunks_needed: ChunksNeeded) -> int:
    """The chunks every prompt is encoded in (chunk mode): what the longest needs, if the folder allows it."""
    needed = chunks_needed(prompts)
    if needed > limit:
        raise _fail(f"a prompt needs {needed} chunks of 75 tokens; this folder was built for at most {limit} "
                    "(prompt_chunks): shorten it or rebuild with a larger --prompt-chunks")
    return needed


def _prompts(spec: ModelSpec, ranges: ShapeRanges, args: GenerationArgs, chunks_needed: ChunksNeeded) -> Prompts:
    """Prompt texts per text encoder (prompt / prompt_2), negatives, clip_skip and the long-prompt mode."""
    encoders = len(spec.text_encoders)
    prompts = _texts(args.prompt, "prompt", None)
    if prompts is None:
        raise _fail("prompt is required (a string or a list of strings)")
    count = len(prompts)
    second = [k for k in ("prompt_2", "negative_prompt_2") if getattr(args, k) is not None]
    if second and encoders < 2:
        raise _fail(f"{', '.join(second)} feed SDXL's second text encoder; this {spec.family} folder has one "
                    "text encoder: use prompt / negative_prompt")
    texts = (prompts, _texts(args.prompt_2, "prompt_2", count) or prompts)[:encoders]
    negatives = _texts(args.negative_prompt, "negative_prompt", count)
    negative_texts = None
    if negatives is not None or args.negative_prompt_2 is not None:
        negatives = negatives or ("",) * count
        negative_2 = _texts(args.negative_prompt_2, "negative_prompt_2", count) or negatives
        negative_texts = (negatives, negative_2)[:encoders]
    clip_skip = 0 if args.clip_skip is None else _int(args.clip_skip, "clip_skip", 0, spec.clip_skip_max,
                                                      " (or None) for this folder")
    result = Prompts(texts, negative_texts, clip_skip, None)
    if args.long_prompts == "truncate":
        return result
    return Prompts(texts, negative_texts, clip_skip, _chunks(result, ranges.prompt_chunks, chunks_needed))


@dataclass(frozen=True)
class _Pictures:
    images: np.ndarray | None
    image_latents: np.ndarray | None
    masks: np.ndarray | None
    height: int
    width: int


def _input_latents(spec: ModelSpec, image_latents: np.ndarray, count: int, num_images: int,
                   args: GenerationArgs) -> tuple[int, int]:
    """Check latents passed as ``image``; the (height, width) they imply."""
    source = args.image
    space = source.latent_space if isinstance(source, GenerationResult | TaggedLatents) else None
    if space is not None and tuple(space) != latent_space(spec):
        origin = f"{source.source} ({source.family} latents)" if isinstance(source, TaggedLatents) else "latents"
        raise _fail(f"these {origin} come from a folder with latent space {tuple(space)} (scaling "
                    f"factor, VAE factor, channels); this {spec.family} folder uses {latent_space(spec)}: "
                    "hand latents only between matching folders (SDXL base -> refiner)")
    if image_latents.shape[0] not in (1, count, num_images):
        raise _fail(f"image latents have batch {image_latents.shape[0]}; pass 1, one per prompt ({count}) "
                    f"or one per image ({num_images})")
    factor = spec.vae_scale_factor
    implied = (image_latents.shape[2] * factor, image_latents.shape[3] * factor)
    if (args.height, args.width) not in ((None, None), implied):
        raise _fail(f"height/width {args.height}x{args.width} differ from the latents' {implied[0]}x{implied[1]}")
    return implied


def _pictures(spec: ModelSpec, ranges: ShapeRanges, task: str, count: int, num_images: int,
              args: GenerationArgs) -> _Pictures:
    """Input pictures / latents / masks converted, and the generation size (default: the picture's, else the
    folder's opt)."""
    factor, channels = spec.vae_scale_factor, spec.latent_channels
    pictures = image_latents = masks = None
    height, width = args.height, args.width
    if task != "txt2img":
        pictures, image_latents = _image_inputs(args.image, count, channels)
        if image_latents is not None:
            height, width = _input_latents(spec, image_latents, count, num_images, args)
        elif height is None or width is None:
            try:
                guess = default_size(pictures[0], factor)
            except (ValueError, TypeError) as exc:
                raise _fail(f"image: {exc}") from exc
            height, width = height or guess[0], width or guess[1]
    if task == "inpaint":
        if image_latents is not None and spec.inpaint:
            raise _fail("an inpainting UNet needs the masked picture: pass image= as a picture, not latents")
        masks = _per_prompt(args.mask_image, count, "mask_image")
    height = _size(ranges.height[1] if height is None else height, "height", ranges.height, factor)
    width = _size(ranges.width[1] if width is None else width, "width", ranges.width, factor)
    images = None if pictures is None else _convert(pictures, "image", preprocess_image, height, width)
    masks = None if masks is None else _convert(masks, "mask_image", preprocess_mask, height, width)
    return _Pictures(images, image_latents, masks, height, width)


def _schedule(task: str, default_strength: float | None,
              args: GenerationArgs) -> tuple[int, float | None, float | None, float | None]:
    """(steps, strength, denoising_start, denoising_end) checked like the scheduler will use them."""
    steps = _int(args.num_inference_steps, "num_inference_steps", 1, 10**6)
    strength = args.strength
    if task == "txt2img":
        for name in ("strength", "denoising_start"):
            if getattr(args, name) is not None:
                raise _fail(f"{name} applies to image-to-image and inpainting; pass image= or drop {name}")
    else:
        strength = _number(default_strength if strength is None else strength, "strength", 0.0, 1.0, open_low=True)
    start, end = (None if getattr(args, k) is None else _number(getattr(args, k), k, 0.0, 1.0, open_low=True,
                                                                 open_high=True)
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
    try:
        array = np.asarray(latents, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise _fail(f"latents must be a float array of shape {list(shape)}: {exc}") from exc
    if array.shape != shape:
        raise _fail(f"latents have shape {list(array.shape)}; this request needs {list(shape)}")
    return _finite(array, "latents")


def _task(spec: ModelSpec, args: GenerationArgs) -> str:
    """The task, checked against what the folder can do."""
    task = task_of(args.image, args.mask_image)
    unsupported = spec.family_record.task_error(task)
    if unsupported:
        raise _fail(unsupported)
    if spec.inpaint and task != "inpaint":
        raise _fail("this is an inpainting folder (9-channel UNet): pass image= and mask_image=")
    return task


def build_request(spec: ModelSpec, ranges: ShapeRanges, args: GenerationArgs,
                  chunks_needed: ChunksNeeded) -> Request:
    """Validate the generation arguments for this folder, pictures converted; raise RequestError naming the value."""
    check_closed_sets(args)
    check_callables(args)
    task = _task(spec, args)
    defaults = spec.family_record.call_defaults[task]
    default_guidance, default_strength = defaults.guidance_scale, defaults.strength
    prompts = _prompts(spec, ranges, args, chunks_needed)
    count = prompts.count
    per_prompt = _int(args.num_images_per_prompt, "num_images_per_prompt", 1, ranges.batch[2])
    lo, _, hi = ranges.batch
    if not lo <= count * per_prompt <= hi:
        raise _fail(f"{count} prompt(s) x num_images_per_prompt={per_prompt} = {count * per_prompt} images; this "
                    f"folder was built for {lo}..{hi} images per call (batch range {tuple(ranges.batch)})")
    num_images = count * per_prompt
    steps, strength, start, end = _schedule(task, default_strength, args)
    pictures = _pictures(spec, ranges, task, count, num_images, args)
    guidance = _number(default_guidance if args.guidance_scale is None else args.guidance_scale,
                       "guidance_scale", 0.0, 1e4)
    rescale = _number(args.guidance_rescale, "guidance_rescale", 0.0, 1.0)
    eta = _number(args.eta, "eta", 0.0, 1.0)
    factor = spec.vae_scale_factor
    latents = _latents(task, args.latents, (num_images, spec.latent_channels, pictures.height // factor,
                                            pictures.width // factor))
    try:
        seeds = check_seeds(args.seed, num_images)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    return Request(task, prompts, per_prompt, pictures.height, pictures.width, steps, guidance, rescale, strength,
                   start, end, eta, seeds, args.rng, latents, pictures.images, pictures.image_latents,
                   pictures.masks, _sizes(args), args.output_type)


def latent_space(spec: ModelSpec) -> tuple[float, int, int]:
    """(scaling_factor, vae_scale_factor, latent channels): what decides whether latents can move between folders."""
    return spec.scaling_factor, spec.vae_scale_factor, spec.latent_channels
