"""SA-Solver, stochastic Adams predictor-corrector (diffusers' ``SASolverScheduler``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from . import f32
from .base import Entry, Schedule
from .betas import BETA_DEFAULTS
from .config import SchedulerConfigError, check_choice
from .dpm_solver import DPMSolverMultistepScheduler
from .multistep import (
    SIGMA_FLAG_DEFAULTS,
    THRESHOLD_DEFAULTS,
    MultistepScheduler,
    alpha_sigma,
    level,
    log_snr,
    require_finite,
)
from .ops import Array
from .prediction import AlphaParam

F = np.float32


def _cube(x: F) -> F:
    return x * x * x  # torch's x ** 3 on float32


def _exp_negative(order: int, s: F, e: F) -> F:
    """``get_coefficients_exponential_negative``: the integral of ``exp(-lambda) lambda^order`` over [s, e]."""
    poly = [lambda x: F(1.0), lambda x: x + 1, lambda x: x * x + 2 * x + 2,
            lambda x: _cube(x) + 3 * (x * x) + 6 * x + 6][order]
    if order == 0:
        return f32.exp(-e) * (f32.exp(e - s) - 1)
    return f32.exp(-e) * (poly(s) * f32.exp(e - s) - poly(e))


def _exp_positive(order: int, s: F, e: F, tau: int) -> F:
    """``get_coefficients_exponential_positive`` (data prediction, ``tau`` the stochasticity)."""
    k = 1 + tau**2
    ec, sc = k * e, k * s
    decay = f32.exp(-(ec - sc))
    if order == 0:
        return f32.exp(ec) * (1 - decay) / k
    poly = [None, lambda x: x - 1, lambda x: x * x - 2 * x + 2,
            lambda x: _cube(x) - 3 * (x * x) + 6 * x - 6][order]
    return f32.exp(ec) * (poly(ec) - poly(sc) * decay) / (k ** (order + 1))


def _lagrange(lam: list[F]) -> list[list[Any]]:
    """``lagrange_polynomial_coefficient``: monomial coefficients (highest first) of each Lagrange basis."""
    if len(lam) == 1:
        return [[1]]
    rows = []
    for k, lk in enumerate(lam):
        others = [x for i, x in enumerate(lam) if i != k]
        den = lk - others[0]
        for x in others[1:]:
            den = den * (lk - x)
        row = [1 / den]
        if len(others) == 1:
            row.append(-others[0] / den)
        elif len(others) == 2:
            a, b = others
            row += [(-a - b) / den, a * b / den]
        else:
            a, b, c = others
            row += [(-a - b - c) / den, (a * b + a * c + b * c) / den, (-a * b * c) / den]
        rows.append(row)
    return rows


class _Update(NamedTuple):
    """One stochastic Adams update: ``x_t = c_x * x + sum_i w_i * m_i + c_noise * noise`` (m newest first)."""

    sample: float
    weights: tuple[float, ...]
    noise: float


class _Coefs(NamedTuple):
    level: AlphaParam
    corrector: _Update | None
    predictor: _Update


@dataclass
class _State:
    outputs: list = field(default_factory=list)
    last_sample: Any = None
    last_noise: Any = None


class SASolverScheduler(MultistepScheduler):
    """Adams-Bashforth predictor, then (from the second step) an Adams-Moulton corrector of the previous step.

    Every step draws noise (also where ``tau`` is 0, as in diffusers). ``tau_func`` must be ``None`` (diffusers'
    default: tau = 1 for timesteps in [200, 800], else 0): a Python callable cannot come from a config file.
    """

    class_name = "SASolverScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "predictor_order": 2,
        "corrector_order": 2,
        "prediction_type": "epsilon",
        "tau_func": None,
        **THRESHOLD_DEFAULTS,
        "algorithm_type": "data_prediction",
        "lower_order_final": True,
        **SIGMA_FLAG_DEFAULTS,
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    final_sigma_from_schedule = True
    _last_timestep = DPMSolverMultistepScheduler._last_timestep

    def _setup(self) -> None:
        name = self.class_name
        super()._setup()
        check_choice(name, "algorithm_type", self.config["algorithm_type"], ("data_prediction", "noise_prediction"))
        check_choice(name, "variance_type", self.config["variance_type"], (None, "learned", "learned_range"))
        if self.config["tau_func"] is not None:
            raise SchedulerConfigError(f"{name}: config key 'tau_func' is not supported; allowed: [None]")
        self.orders = int(self.config["predictor_order"]), int(self.config["corrector_order"])
        for key, value in zip(("predictor_order", "corrector_order"), self.orders, strict=True):
            if not 1 <= value <= 4:
                raise SchedulerConfigError(f"{name}: config key {key!r}={value} is not supported; allowed: 1-4")
        self.data = self.config["algorithm_type"] == "data_prediction"
        if not self.data and self.config["thresholding"]:
            raise SchedulerConfigError(
                f"{name}: config key 'thresholding'=True is not supported with algorithm_type='noise_prediction' "
                f"(diffusers indexes its tables with a missing timestep there)"
            )
        self.lambda_t = (np.log(np.sqrt(self.alphas_cumprod)) - np.log(np.sqrt(1 - self.alphas_cumprod))).astype(F)
        self.solver_order = max(self.orders[0], self.orders[1] - 1)  # the history kept

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        sig, ts, total = schedule.sigmas, schedule.timesteps, len(schedule.timesteps)
        (p_max, c_max), keep = self.orders, self.solver_order
        out, corrector = [], None
        for j in range(begin, end):
            lon = min(j - begin, keep)
            p_ord, c_ord = (min(p_max, total - j), min(c_max, total - j + 1)) if self.config[
                "lower_order_final"] else (p_max, c_max)
            predictor = self._update(sig, j, min(p_ord, lon + 1), _tau(ts[j]), False)
            out.append(self._entry(j, ts[j], sig[j], True, _Coefs(level(sig[j]), corrector, predictor)))
            corrector = self._update(sig, j + 1, min(c_ord, lon + 2), _tau(ts[j]), True) if j + 1 < end else None
        return out

    def _update(self, sig: np.ndarray, j: int, order: int, tau: int, moulton: bool) -> _Update:
        """Coefficients of the update from sigma ``sig[j - 1]`` (corrector) or ``sig[j]`` (predictor) onward."""
        t_idx, s_idx = (j, j - 1) if moulton else (j + 1, j)
        (alpha_t, sigma_t), (alpha_s, sigma_s) = alpha_sigma(sig[t_idx]), alpha_sigma(sig[s_idx])
        lam_t, lam_s = log_snr(sig[t_idx]), log_snr(sig[s_idx])
        h, k = lam_t - lam_s, 1 + tau**2
        with np.errstate(all="ignore"):
            lagrange = _lagrange([log_snr(sig[j - i]) for i in range(order)])
            coefs = []
            for row in lagrange:
                c = 0
                for m, weight in enumerate(row):
                    part = (_exp_positive(order - 1 - m, lam_s, lam_t, tau) if self.data
                            else _exp_negative(order - 1 - m, lam_s, lam_t))
                    c = c + weight * part
                coefs.append(c)
            if self.data and order == 2:
                inner = f32.exp(k * (-h))
                if moulton:
                    fix = 1.0 * f32.exp(k * lam_t) * (h / 2 - (h * k - 1 + inner) / (k**2 * h))
                else:
                    fix = 1.0 * f32.exp(k * lam_t) * (h * h / 2 - (h * k - 1 + inner) / (k**2)) / (
                        lam_s - log_snr(sig[j - 1]))
                coefs = [coefs[0] + fix, coefs[1] - fix]
            if self.data:
                scale = k * sigma_t * f32.exp(-(tau**2) * lam_t)
                noise = sigma_t * f32.sqrt(1 - f32.exp(-2 * tau**2 * h))
                sample = f32.exp(-(tau**2) * h) * (sigma_t / sigma_s)
            else:
                scale = -k * alpha_t
                noise = tau * sigma_t * f32.sqrt(f32.exp(2 * h) - 1)
                sample = alpha_t / alpha_s
            weights = [scale * c for c in coefs]
        require_finite(self.class_name, [sample, noise, *weights], f"step {j} has non-finite coefficients")
        return _Update(float(sample), tuple(map(float, weights)), float(noise))

    def _new_state(self) -> _State:
        return _State()

    def _step(
        self, entry: Entry, state: _State, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        if self.config["variance_type"] in ("learned", "learned_range") and self.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        converted = self._convert(model_output, sample, c.level, self.data)
        if c.corrector is not None and state.last_sample is not None:
            sample = _apply(c.corrector, state.last_sample, [converted, *reversed(state.outputs)], state.last_noise)
        state.outputs = [*state.outputs, converted][-self.solver_order :]
        state.last_sample, state.last_noise = sample, noise
        prev = _apply(c.predictor, sample, list(reversed(state.outputs)), noise)
        return prev, (converted if self.data else None)


def _tau(timestep: Any) -> int:
    """diffusers' default ``tau_func``: 1 for timesteps in [200, 800], else 0."""
    return 1 if 200 <= int(timestep) <= 800 else 0


def _apply(update: _Update, sample: Array, outputs: list, noise: Array) -> Array:
    """``(c_x * x + ((w0 m0 + w1 m1) + ...)) + c_noise * noise``, in diffusers' order."""
    grad = None
    for w, m in zip(update.weights, outputs, strict=False):
        grad = w * m if grad is None else grad + w * m
    return update.sample * sample + grad + update.noise * noise
