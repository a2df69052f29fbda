"""DPM-Solver(++) multistep, ODE and SDE variants (diffusers' ``DPMSolverMultistepScheduler``)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import f32
from .base import Entry, Schedule
from .betas import BETA_DEFAULTS
from .config import SchedulerConfigError, check_choice
from .multistep import (
    History,
    MultistepScheduler,
    alpha_sigma,
    level,
    linear_combination,
    log_snr,
    require_finite,
)
from .ops import Array
from .prediction import AlphaParam
from .sigmas import sigma_to_t

F32 = np.float32
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")


class _Coefs(NamedTuple):
    level: AlphaParam
    """Noise level of the current sample (to convert the model output)."""
    order: int
    weights: tuple[float, ...]
    """Weights of the sample, D0, D1, D2 (as many as the order needs) and the noise, in diffusers' order."""
    ratios: tuple[float, ...]
    """Order 2: ``(1 / r0,)``; order 3: ``(1 / r0, 1 / r1, r0 / (r0 + r1), 1 / (r0 + r1))``."""


def _weights(algorithm: str, midpoint: bool, order: int, h: F32, at: tuple, a0: tuple) -> tuple:
    """``(w_sample, w_D0, w_D1, w_D2, w_noise)`` of one update over the log-SNR step ``h``.

    float32, in diffusers' operation order; its ``x - c * D`` is written ``x + (-c) * D`` (same rounding).
    """
    (alpha_t, sigma_t), (alpha_0, sigma_0) = at, a0
    w1 = w2 = noise = F32(0.0)
    if algorithm == "dpmsolver++":
        e = f32.exp(-h) - 1.0
        w0 = -(alpha_t * e)
        if order >= 2:
            w1 = -(0.5 * (alpha_t * e)) if midpoint else alpha_t * (e / h + 1.0)
        if order == 3:
            w2 = -(alpha_t * ((f32.exp(-h) - 1.0 + h) / (h * h) - 0.5))
        return sigma_t / sigma_0, w0, w1, w2, noise
    if algorithm == "sde-dpmsolver++":
        e = 1 - f32.exp(-2.0 * h)
        w0 = alpha_t * e
        if order >= 2:
            w1 = 0.5 * (alpha_t * e) if midpoint else alpha_t * ((1.0 - f32.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        if order == 3:
            w2 = alpha_t * ((1.0 - f32.exp(-2.0 * h) - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5)
        noise = sigma_t * f32.sqrt(1.0 - f32.exp(-2 * h))
        return sigma_t / sigma_0 * f32.exp(-h), w0, w1, w2, noise
    e = f32.exp(h) - 1.0
    if algorithm == "dpmsolver":
        w0 = -(sigma_t * e)
        if order >= 2:
            w1 = -(0.5 * (sigma_t * e)) if midpoint else -(sigma_t * (e / h - 1.0))
        if order == 3:
            w2 = -(sigma_t * ((f32.exp(h) - 1.0 - h) / (h * h) - 0.5))
        return alpha_t / alpha_0, w0, w1, w2, noise
    w0 = -(2.0 * (sigma_t * e))  # sde-dpmsolver: no third order
    if order >= 2:
        w1 = -(sigma_t * e) if midpoint else -(2.0 * (sigma_t * (e / h - 1.0)))
    noise = sigma_t * f32.sqrt(f32.exp(2 * h) - 1.0)
    return alpha_t / alpha_0, w0, w1, w2, noise


class DPMSolverMultistepScheduler(MultistepScheduler):
    """DPM-Solver++ 2M (default), its SDE variant, and the noise-prediction DPM-Solver; orders 1-3."""

    class_name = "DPMSolverMultistepScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    karras_rounds_cosine = False
    parametrisation: tuple = (log_snr, alpha_sigma, level)
    """``(lambda(sigma), (alpha_t, sigma_t)(sigma), noise level(sigma))`` the coefficients are computed from."""

    def _setup(self) -> None:
        super()._setup()
        name = self.class_name
        algorithm = (
            "dpmsolver++" if self.config["algorithm_type"] == "deis" else self.config["algorithm_type"]
        )
        check_choice(name, "algorithm_type", algorithm, ALGORITHMS)
        solver = self.config["solver_type"]
        solver = "midpoint" if solver in ("logrho", "bh1", "bh2") else solver
        check_choice(name, "solver_type", solver, ("midpoint", "heun"))
        check_choice(name, "variance_type", self.config["variance_type"], (None, "learned", "learned_range"))
        if algorithm == "sde-dpmsolver" and self.solver_order == 3:
            raise SchedulerConfigError(
                f"{name}: algorithm_type='sde-dpmsolver' has no third order; use solver_order<=2"
            )
        if not algorithm.endswith("++") and self.config["final_sigmas_type"] == "zero":
            raise SchedulerConfigError(
                f"{name}: final_sigmas_type='zero' is not supported for algorithm_type={algorithm!r} "
                f"(diffusers refuses it too); use final_sigmas_type='sigma_min'"
            )
        self.algorithm, self.solver_type = algorithm, solver
        self.lambda_t = (
            np.log(np.sqrt(self.alphas_cumprod)) - np.log(np.sqrt(1 - self.alphas_cumprod))
        ).astype(np.float32)

    def _last_timestep(self) -> int:
        clipped = int(
            np.searchsorted(self.lambda_t[::-1], float(self.config["lambda_min_clipped"]), side="left")
        )
        return self.num_train_timesteps - clipped

    def _special_sigmas(self, n: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
        if self.sigma_flag is None and self.config.get("use_lu_lambdas"):
            lambdas = np.flip(self.log_sigmas.copy())
            lo, hi = lambdas[-1].item(), lambdas[0].item()
            sigmas = np.exp(hi + np.linspace(0, 1, n) * (lo - hi))
            return (
                sigmas,
                sigma_to_t(sigmas, self.log_sigmas),
                self.config["beta_schedule"] != "squaredcos_cap_v2",
            )
        return super()._special_sigmas(n)

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        sig, total = schedule.sigmas, len(schedule.timesteps)
        lower_final, so = bool(self.config["lower_order_final"]), self.solver_order
        out = []
        for j in range(begin, end):
            final = j == total - 1 and (
                self.config["euler_at_final"]
                or (lower_final and total < 15)
                or self.config["final_sigmas_type"] == "zero"
            )
            second = j == total - 2 and lower_final and total < 15
            done = min(j - begin, so)
            order = 1 if (so == 1 or done < 1 or final) else 2 if (so == 2 or done < 2 or second) else 3
            out.append(
                self._entry(
                    j,
                    schedule.timesteps[j],
                    sig[j],
                    self.algorithm.startswith("sde"),
                    self._coefs(sig, j, order),
                )
            )
        return out

    def _coefs(self, sig: np.ndarray, j: int, order: int) -> _Coefs:
        log_snr, alpha_sigma, level = self.parametrisation
        lam = [log_snr(sig[j + 1])] + [log_snr(sig[j - k]) for k in range(order)]
        h = lam[0] - lam[1]
        midpoint = order == 2 and self.solver_type == "midpoint"
        with np.errstate(all="ignore"):
            w = _weights(self.algorithm, midpoint, order, h, alpha_sigma(sig[j + 1]), alpha_sigma(sig[j]))
            ratios: tuple = ()
            if order == 2:
                ratios = (1.0 / ((lam[1] - lam[2]) / h),)
            elif order == 3:
                r0, r1 = (lam[1] - lam[2]) / h, (lam[2] - lam[3]) / h
                ratios = (1.0 / r0, 1.0 / r1, r0 / (r0 + r1), 1.0 / (r0 + r1))
        weights = (w[0], *w[1 : order + 1], w[4])
        require_finite(self.class_name, [*weights, *ratios], f"step {j} has non-finite coefficients")
        return _Coefs(level(sig[j]), order, tuple(map(float, weights)), tuple(map(float, ratios)))

    def _step(
        self, entry: Entry, state: History, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        converted, m = self._history(state, model_output, sample, c.level)
        ds = [m[-1]]
        if c.order == 2:
            ds.append(c.ratios[0] * (m[-1] - m[-2]))
        elif c.order == 3:
            d1_0, d1_1 = c.ratios[0] * (m[-1] - m[-2]), c.ratios[1] * (m[-2] - m[-3])
            ds += [d1_0 + c.ratios[2] * (d1_0 - d1_1), c.ratios[3] * (d1_0 - d1_1)]
        return combine(c.weights, sample, ds, noise), (converted if self.algorithm.endswith("++") else None)

    def _history(self, state: History, model_output: Array, sample: Array, at: AlphaParam) -> tuple[Array, list]:
        """The model output converted to x0 (DPM-Solver++) or epsilon, and the history it was appended to."""
        if self.config.get("variance_type") in ("learned", "learned_range") and self.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        converted = self._convert(model_output, sample, at, self.algorithm.endswith("++"))
        return converted, self._remember(state, converted)


def combine(weights: tuple[float, ...], sample: Array, ds: list, noise: Array | None) -> Array:
    """``w_x * sample + w_0 * D0 + ... (+ w_noise * noise)``, left to right as diffusers evaluates it."""
    terms = list(zip(weights, [sample, *ds], strict=False))
    if noise is not None:
        terms.append((weights[-1], noise))
    return linear_combination(terms)
