"""Heun's second-order method, two model evaluations per step (diffusers' ``HeunDiscreteScheduler``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .base import Entry, Schedule
from .ops import Array
from .prediction import SigmaParam, X0Processor
from .sigmas import SigmaScheduler, interp_sigmas


class _Coefs(NamedTuple):
    first_order: bool
    level: SigmaParam
    """The sigma the model output is interpreted at (current for the Euler half, next for the correction)."""
    dt: float


@dataclass
class _State:
    derivative: Any = None
    sample: Any = None


class HeunDiscreteScheduler(SigmaScheduler):
    """Plan entries alternate an Euler predictor (even run positions) and the trapezoidal corrector (odd).

    ``plan.timesteps`` lists every model evaluation (``2 N - 1`` for N steps, the last one a plain Euler step
    to sigma 0), so a loop calls the model once per entry.
    """

    class_name = "HeunDiscreteScheduler"
    state_type = _State
    defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    extra_beta_schedules = ("exp",)
    order = 2

    def _setup(self) -> None:
        super()._setup()
        self.process_x0 = X0Processor.from_config(self.config)

    def _schedule(self, num_inference_steps: int) -> Schedule:
        n = num_inference_steps
        timesteps = self._spaced(n)
        sigmas, timesteps = self._converted(interp_sigmas(timesteps, self.train_sigmas), n, timesteps)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)]).astype(np.float32)
        return Schedule(timesteps, n, sigmas, self._init_noise_sigma(sigmas))

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        sig = schedule.sigmas
        out = []
        for j in range(begin, end):
            # diffusers' state machine: a run always starts with a first-order (predictor) call.
            if (j - begin) % 2 == 0:
                coefs = _Coefs(True, SigmaParam.of(sig[j]), float(sig[j + 1] - sig[j]))
            else:
                coefs = _Coefs(False, SigmaParam.of(sig[j]), float(sig[j] - sig[j - 1]))
            out.append(self._entry(j, schedule.timesteps[j], sig[j], False, coefs))
        return out

    def _step(
        self, entry: Entry, state: _State, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        x0 = self.process_x0(c.level.x0(self.prediction_type, model_output, sample))
        derivative = c.level.derivative(x0, sample)
        if c.first_order:
            state.derivative, state.sample = derivative, sample
        else:
            derivative = (state.derivative + derivative) / 2
            sample, state.derivative, state.sample = state.sample, None, None
        return sample + derivative * c.dt, x0
