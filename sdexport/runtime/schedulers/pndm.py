"""Pseudo numerical methods (PRK warm-up + PLMS), SD 1.5's default (diffusers' ``PNDMScheduler``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from . import f32
from .base import Entry, Schedule
from .betas import BETA_DEFAULTS
from .config import SchedulerConfigError
from .discrete import AlphaScheduler
from .ops import Array
from .prediction import AlphaParam


class _Coefs(NamedTuple):
    mode: str
    """'prk0'..'prk3' (Runge-Kutta stage), 'first', 'average', 'ab2', 'ab3' or 'ab4' (linear multistep)."""
    level: AlphaParam
    """Noise level of the timestep the update starts from (for v-prediction)."""
    sample_coef: float
    alpha_diff: float
    denominator: float


@dataclass
class _State:
    ets: list = field(default_factory=list)
    cur_sample: Any = None
    cur_model_output: Any = 0


class PNDMScheduler(AlphaScheduler):
    """Fourth-order linear multistep on the DDIM transfer, warmed up by Runge-Kutta or by a 2nd-order step."""

    class_name = "PNDMScheduler"
    state_type = _State
    defaults = {
        **BETA_DEFAULTS,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    prediction_types = ("epsilon", "v_prediction")

    def _schedule(self, num_inference_steps: int) -> Schedule:
        ascending = super()._schedule(num_inference_steps).timesteps[::-1]
        n, half = num_inference_steps, self.num_train_timesteps // num_inference_steps // 2
        if self.config["skip_prk_steps"]:
            prk = np.array([], dtype=np.int64)
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        else:
            if n < 4:
                raise SchedulerConfigError(
                    f"PNDMScheduler with skip_prk_steps=false needs num_inference_steps >= 4, got {n} "
                    f"(diffusers fails too); use skip_prk_steps=true or more steps"
                )
            prk = ascending[-4:].repeat(2) + np.tile(np.array([0, half]), 4)
            prk = prk[:-1].repeat(2)[1:-1][::-1]
            plms = ascending[:-3][::-1]
        return Schedule(np.concatenate([prk, plms]).astype(np.int64), n)

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        n = schedule.num_inference_steps
        stride = self.num_train_timesteps // n
        prk = schedule.timesteps[: 0 if self.config["skip_prk_steps"] else 12]
        out, ets = [], 0
        for j in range(begin, end):
            c, tp = j - begin, int(schedule.timesteps[j])  # diffusers' counter restarts at the first step run
            if c < len(prk):
                t, prev_t = int(prk[c // 4 * 4]), tp - (0 if c % 2 else stride // 2)
                mode = f"prk{c % 4}"
                if c % 4 == 0:
                    ets += 1
            else:
                t, prev_t = (tp + stride, tp) if c == 1 else (tp, tp - stride)
                if c != 1:
                    ets = min(ets, 3) + 1
                mode = ("first" if c == 0 else "average") if ets == 1 else f"ab{ets}"
            a_t, a_prev = self.alpha(t), self.alpha(prev_t)
            b_t, b_prev = 1 - a_t, 1 - a_prev
            denominator = a_t * f32.sqrt(b_prev) + f32.sqrt(a_t * b_t * a_prev)
            sample_coef = f32.sqrt(a_prev / a_t)
            coefs = _Coefs(mode, self.param(a_t), float(sample_coef), float(a_prev - a_t), float(denominator))
            out.append(self._entry(j, tp, False, coefs))
        return out

    def _step(
        self, entry: Entry, state: _State, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        mode, m = c.mode, model_output
        if mode.startswith("prk"):
            stage = int(mode[3])
            if stage == 0:
                state.cur_model_output = state.cur_model_output + 1 / 6 * m
                state.ets.append(m)
                state.cur_sample = sample
            elif stage in (1, 2):
                state.cur_model_output = state.cur_model_output + 1 / 3 * m
            else:
                m = state.cur_model_output + 1 / 6 * m
                state.cur_model_output = 0
            sample = state.cur_sample if state.cur_sample is not None else sample
        else:
            if mode != "average":
                state.ets = [*state.ets[-3:], m]
            ets = state.ets
            if mode == "first":
                state.cur_sample = sample
            elif mode == "average":
                m = (m + ets[-1]) / 2
                sample, state.cur_sample = state.cur_sample, None
            elif mode == "ab2":
                m = (3 * ets[-1] - ets[-2]) / 2
            elif mode == "ab3":
                m = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
            else:
                m = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        if self.prediction_type == "v_prediction":
            m = c.level.eps("v_prediction", m, sample)
        return c.sample_coef * sample - c.alpha_diff * m / c.denominator, None
