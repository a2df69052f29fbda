"""Euler ancestral sampling (diffusers' ``EulerAncestralDiscreteScheduler``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import f32
from .base import Entry, Schedule
from .betas import BETA_DEFAULTS
from .ops import Array
from .prediction import SigmaParam
from .sigmas import SigmaScheduler, interp_sigmas


class _Coefs(NamedTuple):
    level: SigmaParam
    dt: float
    sigma_up: float


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """An Euler step down to sigma_down, then fresh noise of scale sigma_up (a noise draw at every step)."""

    class_name = "EulerAncestralDiscreteScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    prediction_types = ("epsilon", "v_prediction")

    def _schedule(self, num_inference_steps: int) -> Schedule:
        timesteps = self._spaced(num_inference_steps)
        sigmas = np.concatenate([interp_sigmas(timesteps, self.train_sigmas), [0.0]]).astype(np.float32)
        return Schedule(timesteps, num_inference_steps, sigmas, self._init_noise_sigma(sigmas))

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        sig = schedule.sigmas
        out = []
        for j in range(begin, end):
            s_from, s_to = sig[j], sig[j + 1]
            sigma_up = f32.sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from))
            # float32 cancellation can make this negative (diffusers then gives NaN); we clamp to 0.
            sigma_down = f32.sqrt(max(s_to * s_to - sigma_up * sigma_up, f32.F(0.0)))
            coefs = _Coefs(SigmaParam.of(s_from), float(sigma_down - s_from), float(sigma_up))
            out.append(self._entry(j, schedule.timesteps[j], s_from, True, coefs))
        return out

    def _step(
        self, entry: Entry, state: Any, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        x0 = c.level.x0(self.prediction_type, model_output, sample)
        prev = sample + c.level.derivative(x0, sample) * c.dt  # the Euler step down to sigma_down
        return prev + noise * c.sigma_up, x0
