"""The denoising loop: classifier-free guidance in one batched UNet call, rescale, scheduler step, inpaint blend.

The loop is array-API code: on the host it runs on numpy; with a device backend (TensorRT + CuPy) every array it
touches stays on the device, and the host only uploads the inputs once and reads the result once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdexport.engines.arrays import HOST, Arrays, namespace
from sdexport.runtime.backends import EngineRunner
from sdexport.runtime.conditioning import Conditioning
from sdexport.runtime.latents import Start
from sdexport.runtime.noise import NoiseStreams
from sdexport.runtime.result import NonFiniteError, StepCallback, Timings
from sdexport.runtime.schedulers import Plan


class Cancelled(Exception):
    """Internal: the callback asked to stop after ``step``; ``latents`` are the latents at that point."""

    def __init__(self, step: int, latents: Any) -> None:
        super().__init__(step)
        self.step = step
        self.latents = latents


def _f32(value: float) -> float:
    """``value`` rounded to float32, as a Python float: array-API libraries take Python scalars (weakly typed, so a
    float32 array stays float32), and the rounding keeps diffusers' float32 arithmetic."""
    return float(np.float32(value))


def rescale_noise_cfg(guided: Any, text: Any, guidance_rescale: float) -> Any:
    """diffusers' ``rescale_noise_cfg``: match the guided prediction's std to the text prediction's, then mix."""
    xp = namespace(guided, text)
    axes = tuple(range(1, guided.ndim))
    std_text = xp.std(text, axis=axes, correction=1, keepdims=True)
    std_cfg = xp.std(guided, axis=axes, correction=1, keepdims=True)
    rescaled = guided * (std_text / std_cfg)
    return _f32(guidance_rescale) * rescaled + _f32(1 - guidance_rescale) * guided


@dataclass
class Guidance:
    """How model outputs combine: scale (CFG when > 1) and rescale factor."""

    scale: float
    rescale: float

    def combine(self, out: Any, cfg: bool) -> Any:
        """[2N or N, 4, h, w] UNet output -> guided [N, 4, h, w] prediction."""
        if not cfg:
            return out
        half = out.shape[0] // 2
        uncond, text = out[:half, ...], out[half:, ...]
        guided = uncond + _f32(self.scale) * (text - uncond)
        if self.rescale > 0.0:
            guided = rescale_noise_cfg(guided, text, self.rescale)
        return guided


class FiniteChecks:
    """NaN / Inf checks of the UNet output: at once on the host; on a device, read back together when the host waits
    anyway (a callback, the end of the loop), so that checking never stalls the GPU between steps."""

    def __init__(self, arrays: Arrays) -> None:
        self.arrays = arrays
        self.pending: list[tuple[int, Any]] = []

    def add(self, step: int, prediction: Any) -> None:
        xp = self.arrays.xp
        finite = xp.all(xp.isfinite(prediction))
        if not self.arrays.synchronous:
            self.pending.append((step, finite))
        elif not bool(finite):
            raise NonFiniteError("unet", step)

    def flush(self) -> None:
        """Raise NonFiniteError naming the first step whose prediction was not finite."""
        if not self.pending:
            return
        steps = [step for step, _ in self.pending]
        flags = self.arrays.get(self.arrays.xp.stack([flag for _, flag in self.pending]))
        self.pending.clear()
        bad = [step for step, ok in zip(steps, flags.tolist(), strict=True) if not ok]
        if bad:
            raise NonFiniteError("unet", bad[0])


class StepClock:
    """Per-step wall and UNet times from ``arrays.clock`` marks (CUDA events on a device: no waiting per step),
    written to ``timings`` once the marked work has run."""

    def __init__(self, arrays: Arrays, timings: Timings) -> None:
        self.arrays = arrays
        self.timings = timings
        self.marks: list[Any] = []

    def mark(self) -> None:
        """Four marks per step: step start, UNet start, UNet end, step end."""
        self.marks.append(self.arrays.clock())

    def record(self) -> None:
        """Append the times of every completed step marked so far."""
        elapsed = self.arrays.elapsed
        while len(self.marks) >= 4:
            start, unet_start, unet_end, end = self.marks[:4]
            del self.marks[:4]
            self.timings.unet.append(elapsed(unet_start, unet_end))
            self.timings.steps.append(elapsed(start, end))


@dataclass
class _Uploaded:
    """Everything the loop reads, put into the loop's arrays once, before the first step."""

    feeds: dict[str, Any]
    latents: Any
    timesteps: Any
    noises: Any
    extra: Any
    blend: tuple[Any, Any, Any] | None
    copies: int


def _upload(plan: Plan, start: Start, cond: Conditioning, streams: NoiseStreams, arrays: Arrays) -> _Uploaded:
    """Conditioning, start latents, every step's timesteps and scheduler noise (drawn in diffusers' order), and the
    inpainting inputs, as ``arrays``."""
    put = arrays.put
    copies = 2 if cond.cfg else 1
    rows = start.latents.shape[0] * copies
    timesteps = put(np.repeat(np.asarray(plan.timesteps, dtype=np.float32)[:, None], rows, axis=1))
    drawn = [streams.draw(start.latents.shape[1:]) for needed in plan.needs_noise if needed]
    extra = None
    if start.masked_latents is not None:
        extra = np.concatenate([start.mask, start.masked_latents], axis=1)
        extra = put(np.concatenate([extra] * copies) if copies > 1 else extra)
    blend = None
    if start.image_latents is not None:
        blend = (put(start.image_latents), put(start.mask), put(start.noise))
    return _Uploaded({name: put(value) for name, value in cond.feeds().items()}, put(start.latents), timesteps,
                     put(np.stack(drawn)) if drawn else None, extra, blend, copies)


Control = Callable[[int, Any, dict[str, Any]], dict[str, Any]]
"""``control(step, scaled latents, UNet feeds)`` -> extra UNet feeds: ControlNet residuals (runtime.control)."""


def _predict(unet: EngineRunner, up: _Uploaded, step: int, model_in: Any, scaled: Any,
             control: Control | None) -> Any:
    """The UNet's output at ``step`` (with the ControlNet residuals of ``control`` among its feeds)."""
    feeds = {"sample": model_in, "timestep": up.timesteps[step, ...], **up.feeds}
    if control is not None:
        feeds.update(control(step, scaled, feeds))
    return unet(feeds)["out_sample"]


def denoise(
    plan: Plan,
    start: Start,
    cond: Conditioning,
    guidance: Guidance,
    unet: EngineRunner,
    streams: NoiseStreams,
    timings: Timings,
    callback: StepCallback | None = None,
    arrays: Arrays = HOST,
    control: Control | None = None,
) -> Any:
    """Run every model evaluation of ``plan`` from ``start``; returns the final latents [N, 4, h, w] as ``arrays``.

    The negative and positive halves go through the UNet as one batch of 2N (the runner splits it when the engine's
    batch range is smaller). 4-channel inpainting blends the re-noised original back outside the mask after each
    step; the 9-channel inpainting UNet gets the mask and masked-image latents concatenated to its input. Inputs
    (conditioning, start latents, every step's timesteps and scheduler noise, drawn in diffusers' order) are put
    into ``arrays`` once, before the first step.
    """
    xp = arrays.xp
    stepper = plan.start()
    up = _upload(plan, start, cond, streams, arrays)
    latents = up.latents
    checks = FiniteChecks(arrays)
    clock = StepClock(arrays, timings)
    drawn_index = 0
    last = len(plan) - 1
    for i in range(len(plan)):
        clock.mark()
        model_in = scaled = plan.scale_model_input(latents, i)
        if up.copies > 1:
            model_in = xp.concat([model_in, model_in])
        if up.extra is not None:
            model_in = xp.concat([model_in, up.extra], axis=1)
        clock.mark()
        prediction = _predict(unet, up, i, xp.astype(model_in, xp.float32, copy=False), scaled, control)
        clock.mark()
        checks.add(i, prediction)
        guided = guidance.combine(prediction, cond.cfg)
        noise = None
        if plan.needs_noise[i]:
            noise = up.noises[drawn_index, ...]
            drawn_index += 1
        latents = stepper.step(guided, i, latents, noise=noise).prev_sample
        if up.blend is not None:
            image_latents, mask, first_noise = up.blend
            proper = image_latents if i == last else plan.add_noise(image_latents, first_noise, i + 1)
            latents = (1 - mask) * proper + mask * latents
        latents = xp.astype(latents, xp.float32, copy=False)
        clock.mark()
        if callback is not None:
            checks.flush()
            clock.record()
            if callback(i, len(plan), float(plan.timesteps[i]), latents) is False:
                raise Cancelled(i, latents)
    checks.flush()
    clock.record()
    return latents
