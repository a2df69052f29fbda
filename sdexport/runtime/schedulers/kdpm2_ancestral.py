"""Ancestral DPM-Solver-2 (diffusers' ``KDPM2AncestralDiscreteScheduler``): KDPM2 plus fresh noise per step."""

from __future__ import annotations

import numpy as np

from . import f32
from .base import Entry, Schedule
from .kdpm2 import (
    KDPM2_DEFAULTS,
    KDPM2DiscreteScheduler,
    TwoStageCoefs,
    TwoStageSchedule,
    doubled,
    interleaved,
    log_midpoint,
    two_stage_entry,
)
from .prediction import SigmaParam
from .sigmas import sigma_to_t


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """The KDPM2 step aimed at sigma_down (the midpoint between sigma and sigma_down), then noise of sigma_up."""

    class_name = "KDPM2AncestralDiscreteScheduler"
    defaults = KDPM2_DEFAULTS

    def _schedule(self, num_inference_steps: int) -> Schedule:
        sigmas, timesteps = self._base(num_inference_steps)
        nxt = np.concatenate([sigmas[1:], [0.0]]).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            up = np.sqrt(nxt * nxt * (sigmas * sigmas - nxt * nxt) / (sigmas * sigmas))
            # float32 cancellation can make this negative (diffusers then gives NaN); we clamp to 0.
            down = np.sqrt(np.maximum(nxt * nxt - up * up, f32.F(0.0)))
        down[-1] = 0.0
        interpol = log_midpoint(sigmas, down)
        interpol[-2:] = 0.0
        t_interpol = sigma_to_t(interpol[:-2], self.log_sigmas).astype(timesteps.dtype)
        ts = np.concatenate([timesteps[:1], interleaved(t_interpol, timesteps[1:])])
        full = doubled(sigmas)
        return TwoStageSchedule(
            ts, num_inference_steps, full, self._init_noise_sigma(full), doubled(interpol), doubled(up),
            doubled(down),
        )

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        sig, mid, up, down = schedule.sigmas, schedule.interpol, schedule.up, schedule.down
        out = []
        for j in range(begin, end):
            if (j - begin) % 2 == 0:
                coefs = TwoStageCoefs(True, SigmaParam.of(sig[j]), float(mid[j] - sig[j]))
                out.append(two_stage_entry(j, schedule.timesteps[j], sig[j], sig[j], False, coefs))
            else:
                k = j - 1
                coefs = TwoStageCoefs(False, SigmaParam.of(mid[k]), float(down[k] - sig[k]), float(up[k]))
                out.append(two_stage_entry(j, schedule.timesteps[j], mid[k], sig[j], True, coefs))
        return out
