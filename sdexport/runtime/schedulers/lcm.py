"""Latent consistency model multistep sampling (diffusers' ``LCMScheduler``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import f32
from .base import Entry, Schedule
from .config import SchedulerConfigError
from .discrete import AlphaScheduler
from .ops import Array
from .prediction import AlphaParam

_SIGMA_DATA = 0.5


class _Coefs(NamedTuple):
    level: AlphaParam
    c_skip: float
    c_out: float
    renoise: AlphaParam


class LCMScheduler(AlphaScheduler):
    """Consistency-function denoise at each timestep, then re-noise to the next one (not after the last)."""

    class_name = "LCMScheduler"
    defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    }

    def _schedule(self, num_inference_steps: int) -> Schedule:
        original = int(self.config["original_inference_steps"])
        n = num_inference_steps
        if original > self.num_train_timesteps:
            raise SchedulerConfigError(
                f"LCMScheduler: original_inference_steps={original} must be <= num_train_timesteps "
                f"({self.num_train_timesteps})"
            )
        if n > original:
            raise SchedulerConfigError(
                f"LCMScheduler: num_inference_steps={n} is out of range; allowed: "
                f"1 <= num_inference_steps <= original_inference_steps ({original})"
            )
        k = self.num_train_timesteps // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        return Schedule(origin[indices].astype(np.int64), n)

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        ts = [int(t) for t in schedule.timesteps]
        scaling = f32.F(self.config["timestep_scaling"])
        out = []
        for j in range(begin, end):
            t = ts[j]
            prev_t = ts[j + 1] if j + 1 < len(ts) else t
            scaled = f32.F(t) * scaling
            c_skip = _SIGMA_DATA**2 / (scaled * scaled + _SIGMA_DATA**2)
            c_out = scaled / f32.sqrt(scaled * scaled + _SIGMA_DATA**2)
            coefs = _Coefs(
                self.param(self.alpha(t)), float(c_skip), float(c_out), self.param(self.alpha(prev_t))
            )
            # diffusers compares its step index with the requested N: only the schedule's last step is
            # noiseless (a base plan cut by denoising_end still draws noise at its last step).
            out.append(self._entry(j, t, j != schedule.num_inference_steps - 1, coefs))
        return out

    def _step(
        self, entry: Entry, state: Any, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        x0 = self.process_x0(c.level.x0(self.prediction_type, model_output, sample))
        denoised = c.c_out * x0 + c.c_skip * sample
        if noise is None:
            return denoised, denoised
        return c.renoise.alpha * denoised + c.renoise.sigma * noise, denoised
