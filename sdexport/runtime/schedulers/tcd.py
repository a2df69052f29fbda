"""Trajectory consistency distillation sampling (diffusers' ``TCDScheduler``), for TCD-LoRA models."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import f32
from .base import Entry, Schedule
from .lcm import LCMScheduler
from .ops import Array
from .prediction import AlphaParam


class _Coefs(NamedTuple):
    level: AlphaParam
    """Noise level of the current timestep (to convert the model output)."""
    target: AlphaParam
    """Noise level of ``s = floor((1 - gamma) * t_prev)``, where the prediction is re-noised deterministically."""
    renoise: tuple[float, float] | None
    """``(sqrt(a_prev / a_s), sqrt(1 - a_prev / a_s))`` when fresh noise is added (gamma > 0, not the last step)."""


class TCDScheduler(LCMScheduler):
    """Predict x0 and epsilon, move to timestep s on that trajectory, then forward-diffuse to t_prev with noise.

    ``plan(..., eta=gamma)`` is diffusers' ``step(eta=...)``, the stochasticity ``gamma`` in ``[0, 1]``; the
    diffusers pipelines pass their ``eta`` argument (default 0), so ``eta=0`` is deterministic here too (TCD's
    authors recommend 0.3). ``clip_sample`` / ``thresholding`` are read but unused, as in diffusers.
    """

    class_name = "TCDScheduler"
    uses_eta = True

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        ts = [int(t) for t in schedule.timesteps]
        out = []
        for j in range(begin, end):
            t = ts[j]
            prev_t = ts[j + 1] if j + 1 < len(ts) else 0
            s = int(math.floor(f32.F(1.0 - eta) * f32.F(prev_t)))
            a_prev, a_s = self.alphas_cumprod[prev_t], self.alphas_cumprod[s]
            noisy = eta > 0 and j != schedule.num_inference_steps - 1
            renoise = (float(f32.sqrt(a_prev / a_s)), float(f32.sqrt(1 - a_prev / a_s))) if noisy else None
            coefs = _Coefs(self.param(self.alphas_cumprod[t]), self.param(a_s), renoise)
            out.append(self._entry(j, t, noisy, coefs))
        return out

    def _step(
        self, entry: Entry, state: Any, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        x0 = c.level.x0(self.prediction_type, model_output, sample)
        eps = c.level.eps(self.prediction_type, model_output, sample)
        noised = c.target.alpha * x0 + c.target.sigma * eps
        if c.renoise is None:
            return noised, x0
        return c.renoise[0] * noised + c.renoise[1] * noise, x0
