"""DPM-Solver-2 in k-diffusion form, two model evaluations per step (diffusers' ``KDPM2DiscreteScheduler``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import f32
from .base import Entry, Schedule
from .ops import Array
from .prediction import SigmaParam
from .sigmas import SIGMA_SCHEDULER_DEFAULTS, SigmaScheduler, interp_sigmas, sigma_to_t

KDPM2_DEFAULTS = {**SIGMA_SCHEDULER_DEFAULTS, "beta_start": 0.00085, "beta_end": 0.012}
"""The ``__init__`` arguments and defaults of both diffusers KDPM2 classes."""


def log_midpoint(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """torch's float32 ``a.log().lerp(b.log(), 0.5).exp()``: the geometric mean of two sigma arrays."""
    with np.errstate(divide="ignore", invalid="ignore"):
        la, lb = f32.F(np.log(a.astype(np.float64))), f32.F(np.log(b.astype(np.float64)))
        return f32.F(np.exp((lb - (lb - la) * f32.F(0.5)).astype(np.float64)))


def doubled(x: np.ndarray) -> np.ndarray:
    """diffusers' ``cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])``."""
    return np.concatenate([x[:1], x[1:].repeat(2), x[-1:]])


def interleaved(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """``[first[0], second[0], first[1], second[1], ...]`` (equal lengths)."""
    return np.stack([first, second], axis=-1).reshape(-1)


@dataclass(frozen=True)
class TwoStageSchedule(Schedule):
    """A KDPM2 schedule: per-evaluation sigmas plus the interpolated (midpoint) sigmas, both doubled."""

    interpol: np.ndarray | None = None
    up: np.ndarray | None = None
    down: np.ndarray | None = None


class TwoStageCoefs(NamedTuple):
    """One KDPM2 evaluation: predictor or corrector, the x0 level, the step and (ancestral) the noise scale."""

    first_order: bool
    level: SigmaParam
    """The sigma the model output is interpreted at (current, or the midpoint for the correction)."""
    dt: float
    sigma_up: float = 0.0


@dataclass
class TwoStageState:
    """The sample a predictor step started from, kept for the corrector."""

    sample: Any = None


class KDPM2DiscreteScheduler(SigmaScheduler):
    """A half step to the log-midpoint sigma, then the full step with the midpoint's derivative.

    ``plan.timesteps`` lists every model evaluation (``2 N - 1``; the last is an Euler step to sigma 0).
    """

    class_name = "KDPM2DiscreteScheduler"
    defaults = KDPM2_DEFAULTS
    prediction_types = ("epsilon", "v_prediction")
    order = 2

    def _base(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The N inference sigmas with a final 0 (float32) and their timesteps (diffusers' dtype)."""
        timesteps = self._spaced(n)
        sigmas, timesteps = self._converted(interp_sigmas(timesteps, self.train_sigmas), n, timesteps)
        if self.sigma_flag == "use_karras_sigmas":
            timesteps = timesteps.round()
        return np.concatenate([sigmas, [0.0]]).astype(np.float32), timesteps

    def _schedule(self, num_inference_steps: int) -> Schedule:
        sigmas, timesteps = self._base(num_inference_steps)
        interpol = log_midpoint(sigmas, np.roll(sigmas, 1))
        t_interpol = sigma_to_t(interpol[1:-1], self.log_sigmas).astype(timesteps.dtype)
        ts = np.concatenate([timesteps[:1], interleaved(t_interpol, timesteps[1:])])
        full = doubled(sigmas)
        return TwoStageSchedule(ts, num_inference_steps, full, self._init_noise_sigma(full), doubled(interpol))

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        sig, mid = schedule.sigmas, schedule.interpol
        out = []
        for j in range(begin, end):
            # diffusers' state machine: a run always starts with a first-order (predictor) call.
            if (j - begin) % 2 == 0:
                coefs, scale = TwoStageCoefs(True, SigmaParam.of(sig[j]), float(mid[j + 1] - sig[j])), sig[j]
            else:
                coefs, scale = TwoStageCoefs(False, SigmaParam.of(mid[j]), float(sig[j] - sig[j - 1])), mid[j]
            out.append(two_stage_entry(j, schedule.timesteps[j], scale, sig[j], False, coefs))
        return out

    def _new_state(self) -> TwoStageState:
        return TwoStageState()

    def _step(
        self, entry: Entry, state: TwoStageState, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: TwoStageCoefs = entry.coefs
        x0 = c.level.x0(self.prediction_type, model_output, sample)
        derivative = (sample - x0) / c.level.sigma
        if c.first_order:
            state.sample = sample
        else:
            sample, state.sample = state.sample, None
        prev = sample + derivative * c.dt
        return (prev if noise is None else prev + noise * c.sigma_up), x0


def two_stage_entry(
    index: int, timestep: Any, input_sigma: float, noise_sigma: float, needs_noise: bool, coefs: Any
) -> Entry:
    """An entry whose model input is scaled at ``input_sigma`` and whose ``add_noise`` level is ``noise_sigma``."""
    s = f32.F(input_sigma)
    return Entry(index, float(timestep), float(f32.sqrt(s * s + 1)), (1.0, float(noise_sigma)), needs_noise, coefs)
