"""ControlNet at run time: control images and arguments checked as diffusers' ControlNet pipelines read them, and
the per-step ControlNet calls whose summed residuals feed the UNet.

On a ControlNet folder ``image=`` is the control image (diffusers' naming) and the task is text-to-image. Meanings
follow ``StableDiffusionControlNetPipeline`` / ``StableDiffusionXLControlNetPipeline``: ControlNet k runs at step i
unless ``i / steps < control_guidance_start[k]`` or ``(i + 1) / steps > control_guidance_end[k]``; its residuals are
scaled by ``controlnet_conditioning_scale[k]`` (in guess mode also by ``logspace(-1, 0)`` per residual, and under
guidance it sees only the positive rows, the negative rows getting zero residuals).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sdexport.engines.arrays import Arrays
from sdexport.runtime.args import GenerationArgs
from sdexport.runtime.backends import Runner
from sdexport.runtime.images import default_size, preprocess_image
from sdexport.runtime.result import RequestError
from sdexport.specs import ModelSpec
from sdexport.specs.controlnet import COND_INPUT, SCALE_INPUT, controlnet_components

CONTROL_ARGS = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")
_CONDITIONING = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")


@dataclass(frozen=True)
class ControlInputs:
    """A validated ControlNet request: per ControlNet its image rows [images, 3, H, W] in [0, 1], scale, window."""

    images: tuple[np.ndarray, ...]
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool

    def parameters(self) -> dict[str, Any]:
        """The ControlNet generation parameters, JSON-friendly."""
        return {"controlnet_conditioning_scale": list(self.scales), "control_guidance_start": list(self.starts),
                "control_guidance_end": list(self.ends), "guess_mode": self.guess_mode}


def _per_net(value: Any, name: str, count: int, default: Sequence[float]) -> tuple[float, ...]:
    """A number or a list of one / one per ControlNet -> one finite float per ControlNet."""
    if value is None:
        return tuple(default)
    items = list(value) if isinstance(value, list | tuple) else [value]
    if len(items) == 1:
        items *= count
    ok = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in items)
    if len(items) != count or not ok:
        raise RequestError(f"{name}={value!r}: pass a number, or a list of {count} numbers (one per ControlNet "
                           "of this folder)")
    return tuple(float(v) for v in items)


class Controls:
    """The ControlNets of a compiled folder (the manifest's ``controlnets``), in order; empty for other folders."""

    def __init__(self, manifest: Mapping[str, Any], spec: ModelSpec) -> None:
        self.components = controlnet_components(spec)
        records = {r["component"]: r for r in manifest.get("controlnets", [])}
        self.default_scales = tuple(float(records.get(c, {}).get("conditioning_scale", 1.0))
                                    for c in self.components)
        self.spec = spec

    def __bool__(self) -> bool:
        return bool(self.components)

    def split(self, args: GenerationArgs) -> tuple[GenerationArgs, list[list[Any]] | None]:
        """(the arguments with ``image`` taken out and the size defaulted from it, the control pictures per
        ControlNet); on a folder without ControlNets, the arguments as they are after refusing ControlNet ones."""
        if not self:
            given = [n for n in CONTROL_ARGS if getattr(args, n) is not None] + (["guess_mode"] if args.guess_mode
                                                                                else [])
            if given:
                raise RequestError(f"{', '.join(given)} apply to ControlNet folders; this folder has no ControlNet "
                                   "(build with --controlnet)")
            return args, None
        if args.mask_image is not None:
            raise RequestError("this is a ControlNet folder: image= is the control image and it generates from "
                               "text; mask_image= (inpainting) is not supported here")
        if args.image is None:
            raise RequestError(f"this folder has {len(self.components)} ControlNet(s): pass image= (the control "
                               "image; a list with one per ControlNet for several)")
        pictures = self._pictures(args.image)
        height, width = args.height, args.width
        if height is None or width is None:
            try:
                guess = default_size(pictures[0][0], self.spec.vae_scale_factor)
            except (ValueError, TypeError) as exc:
                raise RequestError(f"image (control image): {exc}") from exc
            height, width = height or guess[0], width or guess[1]
        return replace(args, image=None, height=height, width=width), pictures

    def _pictures(self, image: Any) -> list[list[Any]]:
        """The control pictures per ControlNet (each a list of one, or one per prompt)."""
        count = len(self.components)
        if count == 1:
            return [list(image) if isinstance(image, list | tuple) else [image]]
        if not isinstance(image, list | tuple) or not image:
            raise RequestError(f"this folder has {count} ControlNets: pass image= as a list of {count} control "
                               "images (one per ControlNet)")
        if isinstance(image[0], list | tuple):  # diffusers' nested form: image[prompt][controlnet]
            image = [list(per_net) for per_net in zip(*image, strict=False)]
        if len(image) != count:
            raise RequestError(f"image= has {len(image)} entries; this folder has {count} ControlNets: pass one "
                               "control image per ControlNet")
        return [list(p) if isinstance(p, list | tuple) else [p] for p in image]

    def inputs(self, args: GenerationArgs, pictures: list[list[Any]], prompts: int, per_prompt: int,
               height: int, width: int) -> ControlInputs:
        """Check the ControlNet arguments and convert the control pictures at the generation size."""
        count = len(self.components)
        scales = _per_net(args.controlnet_conditioning_scale, "controlnet_conditioning_scale", count,
                          self.default_scales)
        starts = _per_net(args.control_guidance_start, "control_guidance_start", count, (0.0,) * count)
        ends = _per_net(args.control_guidance_end, "control_guidance_end", count, (1.0,) * count)
        for start, end in zip(starts, ends, strict=True):
            if not 0.0 <= start < end <= 1.0:
                raise RequestError(f"control_guidance_start={start} / control_guidance_end={end}: need "
                                   "0 <= start < end <= 1")
        if not isinstance(args.guess_mode, bool):
            raise RequestError(f"guess_mode={args.guess_mode!r} must be True or False")
        images = tuple(self._rows(p, k, prompts, per_prompt, height, width) for k, p in enumerate(pictures))
        return ControlInputs(images, scales, starts, ends, args.guess_mode)

    def _rows(self, pictures: list[Any], index: int, prompts: int, per_prompt: int, height: int,
              width: int) -> np.ndarray:
        what = "image" if len(self.components) == 1 else f"image[{index}]"
        if len(pictures) not in (1, prompts):
            raise RequestError(f"{what}: got {len(pictures)} control images; pass one, or one per prompt ({prompts})")
        rows = []
        for picture in pictures:
            if isinstance(picture, np.ndarray) and picture.ndim == 4:
                raise RequestError(f"{what} is a control image: pass a picture (PIL image or [H, W, 3] array), "
                                   f"not an array of shape {list(picture.shape)}")
            try:
                rows.append(preprocess_image(picture, height, width, normalize=False))
            except (ValueError, TypeError, OSError) as exc:
                raise RequestError(f"{what} (control image): {exc}") from exc
        array = np.concatenate(rows)
        return np.repeat(array, prompts * per_prompt if len(pictures) == 1 else per_prompt, axis=0)


def guess_scales(residuals: int, scale: float) -> np.ndarray:
    """diffusers' guess-mode factors: ``logspace(-1, 0, residuals)`` (float32) times the scale."""
    factors = np.logspace(-1.0, 0.0, residuals).astype(np.float32)
    return (factors * np.float32(scale)).astype(np.float32)


class ControlLoop:
    """One request's ControlNet calls in the denoising loop: ``loop(i, scaled, unet_feeds)`` -> residual feeds.

    Control images and every step's scales are put into the loop's arrays once; a ControlNet outside its guidance
    window is not run at that step (diffusers multiplies its residuals by 0, which adds exactly nothing).
    """

    def __init__(self, spec: ModelSpec, inputs: ControlInputs, runners: Sequence[Runner], steps: int, cfg: bool,
                 arrays: Arrays) -> None:
        self.arrays = arrays
        self.runners = list(runners)
        self.halve = inputs.guess_mode and cfg
        double = cfg and not self.halve
        self.images = [arrays.put(np.concatenate([im, im]) if double else im) for im in inputs.images]
        net = spec.components[controlnet_components(spec)[0]]
        residuals = len(net.outputs)
        self.residuals = spec.components["unet"].inputs[-residuals:]
        self.names = list(zip([t.name for t in net.outputs], [t.name for t in self.residuals], strict=True))
        self.conditioning = [t.name for t in net.inputs if t.name in _CONDITIONING]
        self.active = [[not (i / steps < s or (i + 1) / steps > e) for s, e in zip(inputs.starts, inputs.ends,
                                                                                   strict=True)]
                       for i in range(steps)]
        rows = self.images[0].shape[0]
        self.scales = []
        for scale in inputs.scales:
            row = guess_scales(residuals, scale) if inputs.guess_mode else np.full(residuals, scale, np.float32)
            self.scales.append(arrays.put(np.ascontiguousarray(np.broadcast_to(row, (rows, residuals)))))
        self.zeros: dict[str, Any] | None = None

    def _zeros(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Zero residuals at the UNet's batch and size (no ControlNet runs at this step), made once."""
        if self.zeros is None:
            batch, _, height, width = feeds["sample"].shape
            env = {"batch": batch, "latent_height": height, "latent_width": width}
            self.zeros = {t.name: self.arrays.put(np.zeros(t.shape(env), np.float32)) for t in self.residuals}
        return self.zeros

    def __call__(self, step: int, scaled: Any, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """The UNet's residual feeds at ``step``; ``scaled``: the scaled latents before the CFG doubling."""
        xp = self.arrays.xp
        if self.halve:
            rows = scaled.shape[0]
            base = {k: feeds[k][rows:, ...] for k in self.conditioning if k != "sample"}
            base["sample"] = xp.astype(scaled, xp.float32, copy=False)
        else:
            base = {k: feeds[k] for k in self.conditioning}
        total: dict[str, Any] | None = None
        for index, runner in enumerate(self.runners):
            if not self.active[step][index]:
                continue
            out = runner({**base, COND_INPUT: self.images[index], SCALE_INPUT: self.scales[index]})
            total = out if total is None else {name: total[name] + out[name] for name in total}
        if total is None:
            return self._zeros(feeds)
        if self.halve:
            total = {name: xp.concat([xp.zeros_like(value), value]) for name, value in total.items()}
        return {unet: total[net] for net, unet in self.names}
