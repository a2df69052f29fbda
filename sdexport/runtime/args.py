"""The generation arguments as one frozen dataclass: type, default, help, allowed values and CLI flag of each."""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from sdexport.runtime.images import OUTPUT_TYPES
from sdexport.runtime.noise import RNGS
from sdexport.runtime.result import RequestError, StepCallback
from sdexport.runtime.schedulers import scheduler_names

LONG_PROMPTS = ("truncate", "chunk")
"""``truncate``: prompts over 75 tokens are cut (diffusers); ``chunk``: encoded in chunks of 75 tokens."""

Pair = tuple[int, int]


@dataclass(frozen=True)
class Arg:
    """What a generation argument is beyond its type and default: help, allowed values, command-line form."""

    help: str
    choices: tuple[str, ...] | None = None
    """A closed set of allowed values (None: any value of the type, checked by the request's own rules)."""
    registry: bool = False
    """The choices come from a registry that also checks library calls itself (scheduler names, any case)."""
    flags: tuple[str, ...] = ()
    """Command-line flags, the first one shown first; default: ``--name-with-dashes``."""
    parse: Callable[[str], Any] | None = None
    """Command-line text -> value; default: int / float / str from the field's type."""
    metavar: str | None = None
    cli: bool = True
    """False: not a ``sdexport run`` flag (a Python object, or decided by the CLI itself, like output_type)."""
    repeat: bool = False
    """The flag may be repeated; the values form a list (``--prompt a --prompt b``)."""


def _arg(default: Any = MISSING, **meta: Any) -> Any:
    return field(default=default, metadata={"arg": Arg(**meta)})


def parse_pair(text: str) -> Pair:
    """``HEIGHTxWIDTH`` or ``TOP,LEFT`` -> two integers."""
    parts = text.replace(",", "x").split("x")
    try:
        first, second = (int(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"{text!r}: expected two integers like 1024x1024 or 0,0") from exc
    return first, second


def parse_json_object(text: str) -> dict[str, Any]:
    """A JSON object given on the command line, e.g. ``'{"use_karras_sigmas": true}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{text!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{text!r}: expected a JSON object of config keys")
    return value


def read_picture(text: str) -> Any:
    """An image file (PNG, JPEG, ...), or a ``.npy`` array (latents, or an [H, W(, C)] picture)."""
    from PIL import Image

    from sdexport.runtime.latent_files import read_latents

    path = Path(text)
    if path.suffix == ".npy":
        return read_latents(path)
    try:
        picture = Image.open(path)
        picture.load()  # decode now: a truncated or corrupt file is reported here, with its name
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"cannot read {text!r} as an image: {exc}") from exc
    return picture


def parse_bool(text: str) -> bool:
    """``true`` / ``false`` (also 1 / 0, yes / no) on the command line."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise ValueError(f"{text!r}: expected true or false")
    return value


def read_array(text: str) -> np.ndarray:
    """A ``.npy`` array file."""
    try:
        return np.load(Path(text))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {text!r} as a .npy array: {exc}") from exc


_SIZE = "SDXL micro-conditioning"


@dataclass(frozen=True)
class GenerationArgs:
    """The arguments of ``Pipeline.__call__`` (diffusers' names); ``sdexport run`` flags are generated from it."""

    prompt: str | list[str] = _arg(help="the prompt; several make a batch", repeat=True)
    negative_prompt: str | list[str] | None = _arg(None, help="what to steer away from (one, or one per prompt)")
    prompt_2: str | list[str] | None = _arg(None, help="SDXL: the second text encoder's prompt (default: prompt)")
    negative_prompt_2: str | list[str] | None = _arg(
        None, help="SDXL: the second text encoder's negative prompt (default: negative_prompt)")
    image: Any = _arg(None, help="image-to-image / inpainting input: a picture (PNG/JPEG), or latents (.npy); on a "
                      "ControlNet folder, the control image", parse=read_picture, metavar="PATH")
    mask_image: Any = _arg(None, help="inpainting mask: white is repainted", flags=("--mask", "--mask-image"),
                           parse=read_picture, metavar="PATH")
    height: int | None = _arg(None, help="pixel height (default: the image's, else the folder's optimum)")
    width: int | None = _arg(None, help="pixel width (default: the image's, else the folder's optimum)")
    num_inference_steps: int = _arg(50, help="denoising steps",
                                    flags=("--steps", "--num-inference-steps"))
    guidance_scale: float | None = _arg(
        None, help="classifier-free guidance scale (default: the pipeline's diffusers default, 7.5 SD / 5.0 SDXL)")
    guidance_rescale: float = _arg(0.0, help="guidance rescale factor, 0..1")
    strength: float | None = _arg(
        None, help="image-to-image / inpainting: how much of the image is repainted, 0 < s <= 1 (default: "
        "diffusers' per pipeline)")
    denoising_start: float | None = _arg(None, help="refiner: fraction of the schedule already done, 0 < f < 1")
    denoising_end: float | None = _arg(None, help="SDXL base: fraction of the schedule to stop at, 0 < f < 1")
    num_images_per_prompt: int = _arg(1, help="images per prompt", flags=("--num-images", "--num-images-per-prompt"))
    seed: int | list[int] | None = _arg(None, help="image i gets seed + i (default: random)")
    latents: np.ndarray | None = _arg(None, help="initial noise [N, 4, h, w] (text-to-image, inpainting); .npy",
                                      parse=read_array, metavar="PATH")
    eta: float = _arg(0.0, help="DDIM stochasticity, 0..1 (DDIM only)")
    clip_skip: int | None = _arg(None, help="CLIP layers to skip from the end (default: none)")
    output_type: str = _arg("pil", help="pil, np (uint8), np_float ([0, 1]) or latent", choices=OUTPUT_TYPES,
                            cli=False)
    scheduler: str | None = _arg(None, help="a diffusers scheduler class name or alias (default: the folder's)",
                                 choices=scheduler_names(), registry=True, metavar="NAME")
    scheduler_config: Mapping[str, Any] | None = _arg(
        None, help="scheduler config keys over the folder's scheduler_config.json (JSON object)",
        parse=parse_json_object, metavar="JSON")
    original_size: Pair | None = _arg(None, help=f"{_SIZE}: original size (default: the generated size)",
                                      parse=parse_pair, metavar="HxW")
    crops_coords_top_left: Pair = _arg((0, 0), help=f"{_SIZE}: crop top-left corner", parse=parse_pair,
                                       metavar="TOP,LEFT")
    target_size: Pair | None = _arg(None, help=f"{_SIZE}: target size (default: the generated size)",
                                    parse=parse_pair, metavar="HxW")
    negative_original_size: Pair | None = _arg(None, help=f"{_SIZE}, negative side (default: original_size)",
                                               parse=parse_pair, metavar="HxW")
    negative_crops_coords_top_left: Pair | None = _arg(
        None, help=f"{_SIZE}, negative side (default: crops_coords_top_left)", parse=parse_pair, metavar="TOP,LEFT")
    negative_target_size: Pair | None = _arg(None, help=f"{_SIZE}, negative side (default: target_size)",
                                             parse=parse_pair, metavar="HxW")
    aesthetic_score: float = _arg(6.0, help="SDXL refiner: aesthetic score of the positive side")
    negative_aesthetic_score: float = _arg(2.5, help="SDXL refiner: aesthetic score of the negative side")
    long_prompts: str = _arg("truncate", help="prompts over 75 tokens: truncate (diffusers) or chunk (up to the "
                             "folder's prompt chunks)", choices=LONG_PROMPTS)
    rng: str = _arg("numpy", help="numpy, or torch: the same noise as diffusers' CPU generator (needs torch)",
                    choices=RNGS)
    ip_adapter_image: Any = _arg(None, help="IP-Adapter image prompt: a picture (folders built with --ip-adapter)",
                                 parse=read_picture, metavar="PATH")
    ip_adapter_scale: float = _arg(1.0, help="IP-Adapter strength, as diffusers' set_ip_adapter_scale (0: ignore the "
                                   "image)")
    controlnet_conditioning_scale: float | list[float] | None = _arg(
        None, help="ControlNet folders: residual scale, one or one per ControlNet (default: the build's "
        "--controlnet scale, else 1.0)", repeat=True, flags=("--controlnet-scale", "--controlnet-conditioning-scale"))
    control_guidance_start: float | list[float] | None = _arg(
        None, help="ControlNet folders: fraction of the steps before each ControlNet starts (default 0.0)",
        repeat=True)
    control_guidance_end: float | list[float] | None = _arg(
        None, help="ControlNet folders: fraction of the steps after which each ControlNet stops (default 1.0)",
        repeat=True)
    guess_mode: bool = _arg(False, help="ControlNet folders: the ControlNets see only the positive prompt, their "
                            "residuals scaled from 0.1 (first) to 1.0 (mid block)", parse=parse_bool,
                            metavar="BOOL")
    callback: StepCallback | None = _arg(
        None, help="callback(step_index, num_steps, timestep, latents) after every step; False cancels", cli=False)


def arg_info(name: str) -> Arg:
    """The metadata of the generation argument ``name``."""
    return _fields()[name].metadata["arg"]


def _fields() -> dict[str, Any]:
    return {f.name: f for f in fields(GenerationArgs)}


def arg_types() -> dict[str, Any]:
    """Argument name -> its resolved type annotation."""
    return typing.get_type_hints(GenerationArgs)


def defaults() -> dict[str, Any]:
    """Argument name -> default, for every argument that has one (``prompt`` has none)."""
    return {name: f.default for name, f in _fields().items() if f.default is not MISSING}


DEFAULTS: Mapping[str, Any] = MappingProxyType(defaults())
"""The defaults of ``Pipeline.__call__``'s signature and of the ``sdexport run`` flags (one place: the dataclass)."""


def cli_fields() -> tuple[str, ...]:
    """The arguments that are ``sdexport run`` flags, in the dataclass's order."""
    return tuple(name for name, f in _fields().items() if f.metadata["arg"].cli)


def cli_parse(name: str) -> Callable[[str], Any]:
    """Command-line text -> value of argument ``name``: its own parser, else int / float / str from its type."""
    info = arg_info(name)
    if info.parse is not None:
        return info.parse
    hint = arg_types()[name]
    members = typing.get_args(hint) or (hint,)
    for scalar in (int, float, str):
        if scalar in members:
            return scalar
    raise TypeError(f"generation argument {name!r} of type {hint} needs Arg(parse=...) or cli=False")


def check_closed_sets(args: GenerationArgs) -> None:
    """Raise RequestError naming the argument when a closed-set value is not one of its choices."""
    for name, f in _fields().items():
        info: Arg = f.metadata["arg"]
        value = getattr(args, name)
        if info.choices is None or info.registry or (value is None and f.default is None):
            continue
        if not isinstance(value, str) or value not in info.choices:
            raise RequestError(f"{name}={value!r} is not one of {list(info.choices)}")


def check_callables(args: GenerationArgs) -> None:
    """Raise RequestError when ``callback`` is given but cannot be called."""
    if args.callback is not None and not callable(args.callback):
        raise RequestError(f"callback={args.callback!r} is not callable: pass a function "
                           "callback(step_index, num_steps, timestep, latents), or None")
