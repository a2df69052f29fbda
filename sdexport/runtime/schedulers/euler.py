"""Euler's method on the probability-flow ODE (diffusers' ``EulerDiscreteScheduler``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import f32
from .base import Entry, Schedule
from .betas import BETA_DEFAULTS, linspace32
from .config import check_choice
from .ops import Array
from .prediction import SigmaParam
from .sigmas import SigmaScheduler, interp_sigmas


class _Coefs(NamedTuple):
    level: SigmaParam
    dt: float


class EulerDiscreteScheduler(SigmaScheduler):
    """x_next = x + (x - x0) / sigma * (sigma_next - sigma); SDXL's default."""

    class_name = "EulerDiscreteScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }
    prediction_types = ("epsilon", "v_prediction", "sample", "original_sample")

    def _setup(self) -> None:
        super()._setup()
        name = self.class_name
        check_choice(name, "interpolation_type", self.config["interpolation_type"], ("linear", "log_linear"))
        check_choice(name, "timestep_type", self.config["timestep_type"], ("discrete", "continuous"))
        check_choice(name, "final_sigmas_type", self.config["final_sigmas_type"], ("zero", "sigma_min"))

    def _schedule(self, num_inference_steps: int) -> Schedule:
        n = num_inference_steps
        timesteps = self._spaced(n)
        if self.config["interpolation_type"] == "linear":
            sigmas = interp_sigmas(timesteps, self.train_sigmas)
        else:
            sigmas = np.exp(linspace32(self.log_sigmas[-1], self.log_sigmas[0], n + 1))
        sigmas, timesteps = self._converted(sigmas, n, timesteps)
        last = self.train_sigmas[0] if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        if self.config["timestep_type"] == "continuous" and self.prediction_type == "v_prediction":
            timesteps = np.array([0.25 * f32.log(s) for s in sigmas[:-1]], dtype=np.float32)
        return Schedule(timesteps.astype(np.float32), n, sigmas, self._init_noise_sigma(sigmas))

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        sig = schedule.sigmas
        return [
            self._entry(
                j,
                schedule.timesteps[j],
                sig[j],
                False,
                _Coefs(SigmaParam.of(sig[j]), float(sig[j + 1] - sig[j])),
            )
            for j in range(begin, end)
        ]

    def _step(
        self, entry: Entry, state: Any, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        x0 = c.level.x0(self.prediction_type, model_output, sample)
        return sample + c.level.derivative(x0, sample) * c.dt, x0
