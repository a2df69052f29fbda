"""The denoising loop: classifier-free guidance in one batched UNet call, rescale, scheduler step, inpaint blend."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sdexport.runtime.backends import EngineRunner
from sdexport.runtime.conditioning import Conditioning
from sdexport.runtime.latents import Start
from sdexport.runtime.noise import NoiseStreams
from sdexport.runtime.result import NonFiniteError, StepCallback, Timings
from sdexport.runtime.schedulers import Plan


class Cancelled(Exception):
    """Internal: the callback asked to stop after ``step``; ``latents`` are the latents at that point."""

    def __init__(self, step: int, latents: np.ndarray) -> None:
        super().__init__(step)
        self.step = step
        self.latents = latents


def rescale_noise_cfg(guided: np.ndarray, text: np.ndarray, guidance_rescale: float) -> np.ndarray:
    """diffusers' ``rescale_noise_cfg``: match the guided prediction's std to the text prediction's, then mix."""
    axes = tuple(range(1, guided.ndim))
    std_text = text.std(axis=axes, ddof=1, keepdims=True)
    std_cfg = guided.std(axis=axes, ddof=1, keepdims=True)
    rescaled = guided * (std_text / std_cfg)
    return np.float32(guidance_rescale) * rescaled + np.float32(1 - guidance_rescale) * guided


@dataclass
class Guidance:
    """How model outputs combine: scale (CFG when > 1) and rescale factor."""

    scale: float
    rescale: float

    def combine(self, out: np.ndarray, cfg: bool) -> np.ndarray:
        """[2N or N, 4, h, w] UNet output -> guided [N, 4, h, w] prediction."""
        if not cfg:
            return out
        half = out.shape[0] // 2
        uncond, text = out[:half], out[half:]
        guided = uncond + np.float32(self.scale) * (text - uncond)
        if self.rescale > 0.0:
            guided = rescale_noise_cfg(guided, text, self.rescale)
        return guided


def denoise(
    plan: Plan,
    start: Start,
    cond: Conditioning,
    guidance: Guidance,
    unet: EngineRunner,
    streams: NoiseStreams,
    timings: Timings,
    callback: StepCallback | None = None,
) -> np.ndarray:
    """Run every model evaluation of ``plan`` from ``start``; returns the final latents [N, 4, h, w].

    The negative and positive halves go through the UNet as one batch of 2N (the runner splits it when the engine's
    batch range is smaller). 4-channel inpainting blends the re-noised original back outside the mask after each
    step; the 9-channel inpainting UNet gets the mask and masked-image latents concatenated to its input.
    """
    stepper = plan.start()
    feeds = cond.feeds()
    copies = 2 if cond.cfg else 1
    extra = None
    if start.masked_latents is not None:
        extra = np.concatenate([start.mask, start.masked_latents], axis=1)
        extra = np.concatenate([extra] * copies) if copies > 1 else extra
    blend = start.image_latents is not None
    latents = start.latents
    rows = latents.shape[0] * copies
    last = len(plan) - 1
    for i in range(len(plan)):
        t0 = time.perf_counter()
        model_in = plan.scale_model_input(latents, i)
        if copies > 1:
            model_in = np.concatenate([model_in, model_in])
        if extra is not None:
            model_in = np.concatenate([model_in, extra], axis=1)
        timestep = np.full((rows,), plan.timesteps[i], dtype=np.float32)
        engine_before = unet.seconds
        out = unet({"sample": np.ascontiguousarray(model_in, dtype=np.float32), "timestep": timestep, **feeds})
        timings.unet.append(unet.seconds - engine_before)
        prediction = out["out_sample"]
        if not np.isfinite(prediction).all():
            raise NonFiniteError("unet", i)
        guided = guidance.combine(prediction, cond.cfg)
        noise = streams.draw(latents.shape[1:]) if plan.needs_noise[i] else None
        latents = stepper.step(guided, i, latents, noise=noise).prev_sample
        if blend:
            proper = start.image_latents if i == last else plan.add_noise(start.image_latents, start.noise, i + 1)
            latents = (1 - start.mask) * proper + start.mask * latents
        latents = latents.astype(np.float32, copy=False)
        timings.steps.append(time.perf_counter() - t0)
        if callback is not None and callback(i, len(plan), float(plan.timesteps[i]), latents) is False:
            raise Cancelled(i, latents)
    return latents
