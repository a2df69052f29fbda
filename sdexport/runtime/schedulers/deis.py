"""DEIS multistep, log-rho solver, orders 1-3 (diffusers' ``DEISMultistepScheduler``)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import f32
from .base import Entry, Schedule
from .betas import BETA_DEFAULTS
from .config import check_choice
from .multistep import (
    SIGMA_FLAG_DEFAULTS,
    THRESHOLD_DEFAULTS,
    History,
    MultistepScheduler,
    alpha_sigma,
    level,
    log_snr,
    require_finite,
)
from .ops import Array
from .prediction import AlphaParam


class _Coefs(NamedTuple):
    level: AlphaParam
    order: int
    weights: tuple[float, ...]
    """Order 1: ``(alpha_t / alpha_s, -sigma_t (e^h - 1))``; else ``(alpha_t, alpha_s0, c1, c2[, c3])``."""


def _log(x: np.float32) -> np.float32:
    """numpy's float32 ``log`` (what diffusers' ``np.log`` of a float32 tensor computes; not always correctly
    rounded, and the DEIS weights cancel enough for its last bit to matter)."""
    return np.log(np.float32(x))


def _ind2(t: np.float32, b: np.float32, c: np.float32) -> np.float32:
    lt, lb, lc = _log(t), _log(b), _log(c)
    return t * (-lc + lt - 1) / (lb - lc)


def _ind3(t: np.float32, b: np.float32, c: np.float32, d: np.float32) -> np.float32:
    lt, lb, lc, ld = _log(t), _log(b), _log(c), _log(d)
    numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt * lt - 2 * lt + 2)
    return numerator / ((lb - lc) * (lb - ld))


def deis_coefficients(rho: list[np.float32]) -> list[np.float32]:
    """The log-rho DEIS weights of the newest, next and oldest model output; ``rho = [rho_t, rho_s0, ...]``."""
    t, s = rho[0], rho[1:]
    if len(s) == 2:
        return [_ind2(t, s[0], s[1]) - _ind2(s[0], s[0], s[1]), _ind2(t, s[1], s[0]) - _ind2(s[0], s[1], s[0])]
    turns = [(s[0], s[1], s[2]), (s[1], s[2], s[0]), (s[2], s[0], s[1])]
    return [_ind3(t, *k) - _ind3(s[0], *k) for k in turns]


class DEISMultistepScheduler(MultistepScheduler):
    """Exponential integrator on epsilon with polynomial extrapolation in log(sigma / alpha)."""

    class_name = "DEISMultistepScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        **THRESHOLD_DEFAULTS,
        "algorithm_type": "deis",
        "solver_type": "logrho",
        "lower_order_final": True,
        **SIGMA_FLAG_DEFAULTS,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    final_sigma_from_schedule = True

    def _setup(self) -> None:
        super()._setup()
        name = self.class_name
        check_choice(name, "algorithm_type", self.config["algorithm_type"], ("deis", "dpmsolver", "dpmsolver++"))
        solvers = ("logrho", "midpoint", "heun", "bh1", "bh2")
        check_choice(name, "solver_type", self.config["solver_type"], solvers)

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        sig, total = schedule.sigmas, len(schedule.timesteps)
        lower_final, so = bool(self.config["lower_order_final"]) and total < 15, self.solver_order
        out = []
        for j in range(begin, end):
            done = min(j - begin, so)
            final, second = lower_final and j == total - 1, lower_final and j == total - 2
            order = 1 if (so == 1 or done < 1 or final) else 2 if (so == 2 or done < 2 or second) else 3
            out.append(self._entry(j, schedule.timesteps[j], sig[j], False, self._coefs(sig, j, order)))
        return out

    def _coefs(self, sig: np.ndarray, j: int, order: int) -> _Coefs:
        (alpha_t, sigma_t), alpha_s = alpha_sigma(sig[j + 1]), alpha_sigma(sig[j])[0]
        with np.errstate(all="ignore"):
            if order == 1:
                h = log_snr(sig[j + 1]) - log_snr(sig[j])
                weights = [alpha_t / alpha_s, -(sigma_t * (f32.exp(h) - 1.0))]
            else:
                rho = [sigma_t / alpha_t] + [s / a for a, s in (alpha_sigma(sig[j - k]) for k in range(order))]
                weights = [alpha_t, alpha_s, *deis_coefficients(rho)]
        require_finite(self.class_name, weights, f"step {j} has non-finite coefficients")
        return _Coefs(level(sig[j]), order, tuple(map(float, weights)))

    def _step(
        self, entry: Entry, state: History, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        x0 = self.process_x0(c.level.x0(self.prediction_type, model_output, sample))
        eps = (sample - c.level.alpha * x0) / c.level.sigma
        m = self._remember(state, eps)
        if c.order == 1:
            return c.weights[0] * sample + c.weights[1] * eps, x0
        acc = sample / c.weights[1]
        for w, out in zip(c.weights[2:], reversed(m), strict=False):
            acc = acc + w * out
        return c.weights[0] * acc, x0
