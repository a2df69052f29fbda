"""DDPM ancestral sampling (diffusers' ``DDPMScheduler``)."""

from __future__ import annotations

from typing import Any, NamedTuple

from . import f32
from .base import Entry, Schedule
from .betas import BETA_DEFAULTS
from .config import check_choice
from .discrete import AlphaScheduler
from .ops import Array
from .prediction import AlphaParam


class _Coefs(NamedTuple):
    level: AlphaParam
    x0_coef: float
    sample_coef: float
    std: float


class DDPMScheduler(AlphaScheduler):
    """Posterior mean of q(x_{t-1} | x_t, x0) plus fixed variance noise at every step with t > 0."""

    class_name = "DDPMScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    extra_beta_schedules = ("sigmoid", "laplace")

    def _setup(self) -> None:
        super()._setup()
        check_choice(
            self.class_name,
            "variance_type",
            self.config["variance_type"],
            ("fixed_small", "fixed_small_log", "fixed_large"),
            why="learned variances need a 2x-channel UNet; fixed_large_log gives NaN in diffusers",
        )

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        ts = [int(t) for t in schedule.timesteps]
        kind = self.config["variance_type"]
        out = []
        for j in range(begin, end):
            t = ts[j]
            prev_t = ts[j + 1] if j + 1 < len(ts) else -1
            a_t, a_prev = self.alpha(t), (self.alpha(prev_t) if prev_t >= 0 else f32.F(1.0))
            b_t, b_prev = 1 - a_t, 1 - a_prev
            cur_alpha = a_t / a_prev
            cur_beta = 1 - cur_alpha
            variance = max(b_prev / b_t * cur_beta, f32.F(1e-20))
            if kind == "fixed_large":
                std = f32.sqrt(cur_beta)
            elif kind == "fixed_small_log":
                std = f32.exp(0.5 * f32.log(variance))
            else:
                std = f32.sqrt(variance)
            x0_coef = f32.sqrt(a_prev) * cur_beta / b_t
            sample_coef = f32.sqrt(cur_alpha) * b_prev / b_t
            coefs = _Coefs(self.param(a_t), float(x0_coef), float(sample_coef), float(std))
            out.append(self._entry(j, t, t > 0, coefs))
        return out

    def _step(
        self, entry: Entry, state: Any, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        x0 = self.process_x0(c.level.x0(self.prediction_type, model_output, sample))
        prev = c.x0_coef * x0 + c.sample_coef * sample
        if noise is not None:
            prev = prev + c.std * noise
        return prev, x0
