"""DDIM, deterministic or with ``eta`` noise (diffusers' ``DDIMScheduler``)."""

from __future__ import annotations

from typing import Any, NamedTuple

from . import f32
from .base import Entry, Schedule
from .betas import BETA_DEFAULTS
from .discrete import AlphaScheduler
from .ops import Array
from .prediction import AlphaParam


class _Coefs(NamedTuple):
    level: AlphaParam
    sqrt_alpha_prev: float
    direction: float
    std: float


class DDIMScheduler(AlphaScheduler):
    """x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std z, std = eta * sigma_t."""

    class_name = "DDIMScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    uses_eta = True

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        # diffusers steps back by T // N whatever the spacing (so linspace / trailing may skip or overlap).
        stride = self.num_train_timesteps // schedule.num_inference_steps
        out = []
        for j in range(begin, end):
            t = int(schedule.timesteps[j])
            a_t, a_prev = self.alpha(t), self.alpha(t - stride)
            b_t, b_prev = 1 - a_t, 1 - a_prev
            std = f32.F(eta) * f32.sqrt((b_prev / b_t) * (1 - a_t / a_prev))
            # diffusers gives NaN where rounding makes this negative (eta = 1, zero terminal SNR); we give 0.
            direction = f32.sqrt(max(1 - a_prev - std * std, f32.F(0.0)))
            coefs = _Coefs(self.param(a_t), float(f32.sqrt(a_prev)), float(direction), float(std))
            out.append(self._entry(j, t, eta > 0, coefs))
        return out

    def _step(
        self, entry: Entry, state: Any, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        x0 = self.process_x0(c.level.x0(self.prediction_type, model_output, sample))
        eps = c.level.eps(self.prediction_type, model_output, sample)
        prev = c.sqrt_alpha_prev * x0 + c.direction * eps
        if noise is not None:
            prev = prev + c.std * noise
        return prev, x0
