"""DPM-Solver++ SDE (diffusers' ``DPMSolverSDEScheduler``): two evaluations per step, Brownian-increment noise.

Each step from ``sigma = s`` to ``sigma_next = n`` first takes an ancestral DPM-Solver++ step to the log-midpoint
``m = sqrt(s n)`` (as float32 ``exp(-(t + t_next) / 2)`` with ``t = -log sigma``), evaluates the model there, then
takes the full step from ``s`` to ``n`` with the midpoint's x0. The last step (to sigma 0) is a plain Euler step
without noise.

The noise. diffusers draws both of a step's noises from one Brownian motion ``W`` over sigma (torchsde's
Brownian tree, seeded by ``noise_sampler_seed``), normalised increments over nested intervals::

    z1 = (W(m) - W(s)) / sqrt(s - m)        (first evaluation, s -> m)
    z2 = (W(n) - W(s)) / sqrt(s - n)        (second evaluation, s -> n)

Each is standard normal; they share the increment over ``[m, s]``, so ``Cov(z1, z2) = sqrt((s - m) / (s - n))``;
increments of different steps cover disjoint intervals and are independent. The scheduler never draws: it asks
the pipeline's noise streams for one independent standard-normal array ``xi`` per evaluation
(``plan.needs_noise``) and builds exactly that joint distribution::

    z1 = xi1
    z2 = sqrt((s - m) / (s - n)) * xi1 + sqrt((m - n) / (s - n)) * xi2

(the Brownian path ``W(m) = W(s) + sqrt(s - m) xi1``, ``W(n) = W(m) + sqrt(m - n) xi2``, normalised). The
result has diffusers' distribution, not its bits: the torchsde tree's own draws are not reproduced, so
``noise_sampler_seed`` is accepted (a config key of the class) but does not select the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import f32
from .base import Entry, Schedule
from .kdpm2 import KDPM2_DEFAULTS, doubled, interleaved, two_stage_entry
from .ops import Array
from .prediction import SigmaParam
from .sigmas import SigmaScheduler, interp_sigmas, sigma_to_t


class _Coefs(NamedTuple):
    """One evaluation: the x0 level, ``prev = keep * sample + take * x0 + noise_scale * z`` and the noise mix."""

    first_order: bool
    level: SigmaParam
    euler_dt: float | None
    """Set on the final step to sigma 0: ``prev = sample + (sample - x0) / sigma * euler_dt``, no noise."""
    keep: float = 0.0
    take: float = 0.0
    noise_scale: float = 0.0
    mix: tuple[float, float] = (1.0, 0.0)
    """``z = mix[0] * xi1 + mix[1] * xi`` (``xi1``: the step's first draw; ``(1, 0)`` on the first evaluation)."""


@dataclass
class _State:
    sample: Any = None
    first_noise: Any = None


def _t(sigma: Any) -> np.float32:
    return -f32.log(sigma)


def _sigma(t: Any) -> np.float32:
    return f32.exp(-t)


def _midpoint(sigma: Any, sigma_next: Any) -> np.float32:
    """diffusers' ``sigma_fn(t + (t_next - t) * 0.5)``, in float32."""
    t = _t(sigma)
    return _sigma(t + (_t(sigma_next) - t) * f32.F(0.5))


def _ancestral(sigma: np.float32, sigma_to: np.float32) -> tuple[float, float, float]:
    """``(keep, take, sigma_up)`` of diffusers' ancestral DPM-Solver++ update from ``sigma`` to ``sigma_to``."""
    t = _t(sigma)
    sigma_from = _sigma(t)
    up = min(sigma_to, f32.sqrt(sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
                                / (sigma_from * sigma_from)))
    down = f32.sqrt(max(sigma_to * sigma_to - up * up, f32.F(0.0)))
    ancestral_t = _t(down)
    keep = _sigma(ancestral_t) / _sigma(t)
    return float(keep), float(-f32.expm1(t - ancestral_t)), float(up)


def _mix(s: float, m: float, n: float) -> tuple[float, float]:
    """The weights of ``xi1`` and ``xi2`` in the normalised increment over ``[n, s]`` (see the module docstring)."""
    s, m, n = float(s), float(m), float(n)
    return math.sqrt((s - m) / (s - n)), math.sqrt((m - n) / (s - n))


@dataclass(frozen=True)
class _SdeSchedule(Schedule):
    """The doubled per-evaluation sigmas plus, per evaluation, the midpoint sigma of its step."""

    mids: np.ndarray | None = None


class DPMSolverSDEScheduler(SigmaScheduler):
    """Entries alternate the half step to the midpoint (even run positions) and the full step (odd).

    ``plan.timesteps`` lists every model evaluation (``2 N - 1``; float64 as in diffusers).
    """

    class_name = "DPMSolverSDEScheduler"
    defaults = {**KDPM2_DEFAULTS, "noise_sampler_seed": None}  # the same __init__ keys, plus the tree's seed
    prediction_types = ("epsilon", "v_prediction")
    karras_reads_config_bounds = False
    state_type = _State
    order = 2

    def _schedule(self, num_inference_steps: int) -> Schedule:
        n = num_inference_steps
        if self.config["timestep_spacing"] == "linspace":  # float64 here (the other sigma schedulers: float32)
            timesteps = np.linspace(0, self.num_train_timesteps - 1, n, dtype=float)[::-1].copy()
        else:  # whole numbers: exact in float32
            timesteps = self._spaced(n).astype(np.float64)
        sigmas, timesteps = self._converted(interp_sigmas(timesteps, self.train_sigmas), n, timesteps)
        t = -np.log(sigmas)
        mid_t = sigma_to_t(np.exp(-(t[:-1] + np.diff(t) * 0.5)), self.log_sigmas)
        ts = np.concatenate([timesteps[:1], interleaved(mid_t, timesteps[1:])]).astype(np.float64)
        full = doubled(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        mids = np.array([_midpoint(a, b) if b > 0 else 0.0
                         for a, b in zip(full[:-1], full[1:], strict=True)], dtype=np.float32)
        return _SdeSchedule(ts, n, full, self._init_noise_sigma(full), mids)

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        sig, mids = schedule.sigmas, schedule.mids
        out = []
        for j in range(begin, end):
            # diffusers' state machine: a run always starts with a first-order (predictor) call.
            first = (j - begin) % 2 == 0
            s, n = (sig[j], sig[j + 1]) if first else (sig[j - 1], sig[j])
            level = s if first else mids[j - 1]
            if n == 0:
                coefs = _Coefs(True, SigmaParam.of(s), float(n - s))
            else:
                m = mids[j] if first else mids[j - 1]
                s_from = _sigma(_t(s))
                target = m if first else _sigma(_t(n))
                keep, take, up = _ancestral(s, target)
                mix = (1.0, 0.0) if first else _mix(s_from, m, target)
                coefs = _Coefs(first, SigmaParam.of(level), None, keep, take, up, mix)
            out.append(two_stage_entry(j, schedule.timesteps[j], level, sig[j], n != 0, coefs))
        return out

    def _step(
        self, entry: Entry, state: _State, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        x0 = c.level.x0(self.prediction_type, model_output, sample)
        if c.euler_dt is not None:
            return sample + c.level.derivative(x0, sample) * c.euler_dt, x0
        if c.first_order:
            state.sample, state.first_noise, z = sample, noise, noise
        else:
            sample, first, state.sample, state.first_noise = state.sample, state.first_noise, None, None
            z = first * c.mix[0] + noise * c.mix[1]
        return sample * c.keep + x0 * c.take + z * c.noise_scale, x0
