"""Euler on the EDM parametrisation (diffusers' ``EDMEulerScheduler``), and the EDM helpers it shares."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from . import f32
from .base import Entry, Schedule, Scheduler
from .betas import linspace32
from .config import check_choice
from .ops import Array

EDM_DEFAULTS: Mapping[str, Any] = {
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "sigma_data": 0.5,
    "sigma_schedule": "karras",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rho": 7.0,
}
"""The EDM keys (and defaults) both diffusers EDM schedulers share."""


@dataclass(frozen=True)
class EDMParam:
    """A noise level of the EDM preconditioning: ``x0 = c_skip * x + c_out * model_output``."""

    c_skip: float
    c_out: float

    @classmethod
    def of(cls, sigma: float, sigma_data: float, kind: str) -> EDMParam:
        """diffusers' ``precondition_outputs`` weights at ``sigma`` (float32), for epsilon or v prediction."""
        s, sd2 = f32.F(sigma), f32.F(sigma_data**2)
        c_skip = sd2 / (s * s + sd2)
        c_out = (s if kind == "epsilon" else -s) * f32.F(sigma_data) / f32.sqrt(s * s + sd2)
        return cls(float(c_skip), float(c_out))

    def x0(self, kind: str, model_output: Array, sample: Array) -> Array:
        """The denoised sample (``kind`` is fixed at construction; kept for the multistep interface)."""
        return self.c_skip * sample + self.c_out * model_output


class EDMScheduler(Scheduler):
    """Schedulers on ``x = x0 + sigma * eps`` with EDM (Karras et al. 2022) preconditioning and sigmas."""

    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")
    ramp_float64: ClassVar[bool] = True
    """EDM Euler builds its Karras ramp in float64, EDM DPM-Solver in float32."""

    def _setup(self) -> None:
        name = self.class_name
        check_choice(name, "prediction_type", self.config["prediction_type"], self.prediction_types)
        check_choice(name, "sigma_schedule", self.config["sigma_schedule"], ("karras", "exponential"))
        check_choice(name, "final_sigmas_type", self.config["final_sigmas_type"], ("zero", "sigma_min"))
        self.prediction_type: str = self.config["prediction_type"]
        self.sigma_data = float(self.config["sigma_data"])

    def edm_sigmas(self, n: int) -> np.ndarray:
        """The N inference sigmas, descending, float32 (``_compute_karras_sigmas`` / ``_exponential``)."""
        lo, hi = float(self.config["sigma_min"]), float(self.config["sigma_max"])
        if self.config["sigma_schedule"] == "exponential":
            return np.flip(np.exp(linspace32(math.log(lo), math.log(hi), n))).astype(np.float32)
        rho = float(self.config["rho"])
        min_inv, max_inv = lo ** (1 / rho), hi ** (1 / rho)
        if self.ramp_float64:
            return ((max_inv + np.linspace(0, 1, n) * (min_inv - max_inv)) ** rho).astype(np.float32)
        ramp = linspace32(0.0, 1.0, n)
        return ((f32.F(max_inv) + ramp * f32.F(min_inv - max_inv)) ** f32.F(rho)).astype(np.float32)

    def edm_schedule(self, n: int, last: float) -> Schedule:
        """Sigmas plus ``last``, and the timesteps ``0.25 log sigma`` (float32)."""
        sigmas = self.edm_sigmas(n)
        timesteps = np.array([0.25 * f32.log(s) for s in sigmas], dtype=np.float32)
        init = float((float(self.config["sigma_max"]) ** 2 + 1) ** 0.5)
        return Schedule(timesteps, n, np.concatenate([sigmas, [last]]).astype(np.float32), init)

    def _entry(self, index: int, timestep: Any, sigma: float, needs_noise: bool, coefs: Any) -> Entry:
        s = f32.F(sigma)
        scale = f32.sqrt(s * s + f32.F(self.sigma_data**2))  # the input is multiplied by c_in = 1 / scale
        return Entry(index, float(timestep), float(scale), (1.0, float(s)), needs_noise, coefs)


class EDMEulerScheduler(EDMScheduler):
    """x_next = x + (x - x0) / sigma * (sigma_next - sigma), x0 from the EDM preconditioning."""

    class_name = "EDMEulerScheduler"
    defaults = {**EDM_DEFAULTS, "final_sigmas_type": "zero"}

    def _schedule(self, num_inference_steps: int) -> Schedule:
        sigmas = self.edm_sigmas(num_inference_steps)
        return self.edm_schedule(num_inference_steps, sigmas[-1] if self.config["final_sigmas_type"] != "zero" else 0.0)

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        sig, out = schedule.sigmas, []
        for j in range(begin, end):
            coefs = (EDMParam.of(sig[j], self.sigma_data, self.prediction_type), float(sig[j]),
                     float(sig[j + 1] - sig[j]))
            out.append(self._entry(j, schedule.timesteps[j], sig[j], False, coefs))
        return out

    def _step(
        self, entry: Entry, state: Any, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        level, sigma, dt = entry.coefs
        x0 = level.x0(self.prediction_type, model_output, sample)
        derivative = (sample - x0) / sigma
        return sample + derivative * dt, x0
