"""Linear multistep (up to 4th order) in sigma (diffusers' ``LMSDiscreteScheduler``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .base import Entry, Schedule
from .ops import Array
from .prediction import SigmaParam
from .sigmas import SIGMA_SCHEDULER_DEFAULTS, SigmaScheduler, interp_sigmas

LMS_ORDER = 4
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(LMS_ORDER)  # exact for the degree <= 3 integrands


def lms_coefficient(sigmas: list[float], j: int, order: int, current: int) -> float:
    """Integral over ``[sigma_j, sigma_{j+1}]`` of the Lagrange basis polynomial of node ``j - current``.

    diffusers evaluates the same integral with ``scipy.integrate.quad``; Gauss-Legendre is exact here.
    """
    a, b = sigmas[j], sigmas[j + 1]
    taus = 0.5 * (b - a) * _NODES + 0.5 * (a + b)
    basis = np.ones_like(taus)
    for k in range(order):
        if k != current:
            basis *= (taus - sigmas[j - k]) / (sigmas[j - current] - sigmas[j - k])
    return float(0.5 * (b - a) * np.dot(_WEIGHTS, basis))


class _Coefs(NamedTuple):
    level: SigmaParam
    lms: tuple[float, ...]
    """Weights of the newest, next newest, ... derivative (extras at an img2img start go unused)."""


@dataclass
class _State:
    derivatives: list = field(default_factory=list)


class LMSDiscreteScheduler(SigmaScheduler):
    """x_next = x + sum_k c_k d_{j-k}, with d = (x - x0) / sigma and c_k integrals of Lagrange polynomials."""

    class_name = "LMSDiscreteScheduler"
    state_type = _State
    defaults = SIGMA_SCHEDULER_DEFAULTS
    karras_reads_config_bounds = False

    def _schedule(self, num_inference_steps: int) -> Schedule:
        n = num_inference_steps
        timesteps = self._spaced(n)
        sigmas, timesteps = self._converted(interp_sigmas(timesteps, self.train_sigmas), n, timesteps)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return Schedule(timesteps.astype(np.float32), n, sigmas, self._init_noise_sigma(sigmas))

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        sig = [float(s) for s in schedule.sigmas]
        out = []
        for j in range(begin, end):
            order = min(j + 1, LMS_ORDER)
            lms = tuple(lms_coefficient(sig, j, order, k) for k in range(order))
            out.append(
                self._entry(j, schedule.timesteps[j], sig[j], False, _Coefs(SigmaParam.of(sig[j]), lms))
            )
        return out

    def _step(
        self, entry: Entry, state: _State, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        x0 = c.level.x0(self.prediction_type, model_output, sample)
        state.derivatives = [*state.derivatives[-(LMS_ORDER - 1) :], c.level.derivative(x0, sample)]
        update = sum(w * d for w, d in zip(c.lms, reversed(state.derivatives), strict=False))
        return sample + update, x0
