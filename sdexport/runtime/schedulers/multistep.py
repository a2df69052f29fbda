"""Shared base of the exponential-integrator multistep solvers (DPM-Solver, UniPC) working in log-SNR time."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from . import f32
from .base import Entry, Schedule, Scheduler
from .betas import alphas_cumprod, train_sigmas
from .config import SchedulerConfigError, check_choice
from .ops import Array
from .prediction import AlphaParam, X0Processor
from .sigmas import (
    check_sigma_flags,
    interp_sigmas,
    sigma_bounds,
    sigma_to_t,
    spaced_sigmas,
)
from .timesteps import spaced_timesteps

THRESHOLD_DEFAULTS: Mapping[str, Any] = {
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}
"""The x0 dynamic-thresholding keys of the diffusers solvers, with their defaults."""
SIGMA_FLAG_DEFAULTS: Mapping[str, Any] = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
}
"""The sigma-spacing keys of the diffusers solvers, with their defaults."""


def alpha_sigma(sigma: float) -> tuple[np.float32, np.float32]:
    """``(alpha_t, sigma_t)`` of the variance-preserving process at k-diffusion level ``sigma`` (float32)."""
    s = f32.F(sigma)
    alpha = 1 / f32.sqrt(s * s + 1)
    return alpha, s * alpha


def level(sigma: float) -> AlphaParam:
    """The ``x_t = alpha_t x0 + sigma_t eps`` noise level at k-diffusion ``sigma``."""
    alpha, s = alpha_sigma(sigma)
    return AlphaParam(float(alpha), float(s))


def log_snr(sigma: float) -> np.float32:
    """``lambda = log(alpha_t) - log(sigma_t)`` in float32; ``+inf`` at sigma 0 (the clean end)."""
    alpha, s = alpha_sigma(sigma)
    return f32.log(alpha) - f32.log(s)


def linear_combination(terms: Sequence[tuple[float, Array]]) -> Array:
    """``c0 * x0 + c1 * x1 + ...`` evaluated left to right (diffusers' order), skipping zero weights."""
    out = None
    for c, x in terms:
        if c == 0.0:
            continue
        out = c * x if out is None else out + c * x
    return out if out is not None else 0.0 * terms[0][1]


def require_finite(class_name: str, values: Sequence[float], why: str) -> None:
    """Refuse a plan whose coefficients are not finite (diffusers would produce NaN / inf samples there)."""
    with np.errstate(invalid="ignore"):
        if not all(math.isfinite(float(v)) for v in values):
            raise SchedulerConfigError(f"{class_name}: {why}")


@dataclass
class History:
    """Per-run multistep history: converted model outputs (newest last) and the last predictor input."""

    outputs: list = field(default_factory=list)
    last_sample: Any = None


class MultistepScheduler(Scheduler):
    """Solvers on ``x_t = alpha_t x0 + sigma_t eps`` that keep past model outputs; model input is unscaled."""

    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "sample", "v_prediction")
    state_type = History
    unsupported_flags: ClassVar[tuple[str, ...]] = ("use_flow_sigmas", "use_dynamic_shifting")
    karras_rounds_cosine: ClassVar[bool] = True
    """UniPC rounds Karras timesteps for every beta schedule; DPM-Solver not for ``squaredcos_cap_v2``."""
    final_sigma_from_schedule: ClassVar[bool] = False
    """UniPC's ``final_sigmas_type="sigma_min"`` after Karras / exponential sigmas repeats the last one."""

    def _setup(self) -> None:
        name = self.class_name
        check_choice(name, "prediction_type", self.config["prediction_type"], self.prediction_types)
        for key in self.unsupported_flags:
            if self.config.get(key):
                raise SchedulerConfigError(
                    f"{name}: config key {key!r}={self.config[key]!r} is not supported (flow-matching "
                    f"options and solver_p are not implemented); remove it or set it to its default"
                )
        final = self.config.get("final_sigmas_type", "sigma_min")  # DEIS has no key: its last sigma is sigma_min
        check_choice(name, "final_sigmas_type", final, ("zero", "sigma_min"))
        self.prediction_type: str = self.config["prediction_type"]
        self.solver_order = int(self.config.get("solver_order", 1))  # SA-Solver: orders checked there
        if self.solver_order not in (1, 2, 3):
            raise SchedulerConfigError(
                f"{name}: solver_order={self.solver_order} is not supported; allowed: 1, 2, 3"
            )
        self.alphas_cumprod = alphas_cumprod(name, self.config, zero_snr_floor=True)
        self.train_sigmas = train_sigmas(self.alphas_cumprod)
        self.train_sigmas.flags.writeable = False
        self.log_sigmas = np.log(self.train_sigmas)
        self.sigma_flag = check_sigma_flags(self)
        self.process_x0 = X0Processor.from_config(self.config)

    def _last_timestep(self) -> int:
        return self.num_train_timesteps

    def _special_sigmas(self, n: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """``(sigmas, timesteps, round_timesteps)`` for Karras / exponential / beta sigmas, else ``None``."""
        if self.sigma_flag is None:
            return None
        descending = np.flip(self.train_sigmas).copy()
        lo, hi = sigma_bounds(self, descending)
        karras = self.sigma_flag == "use_karras_sigmas"
        sigmas = spaced_sigmas(self.sigma_flag, lo, hi, n)
        rounded = karras and (
            self.karras_rounds_cosine or self.config["beta_schedule"] != "squaredcos_cap_v2"
        )
        return sigmas, sigma_to_t(sigmas, self.log_sigmas), rounded

    def _schedule(self, num_inference_steps: int) -> Schedule:
        n = num_inference_steps
        timesteps = spaced_timesteps(
            self.class_name,
            self.config.get("timestep_spacing", "linspace"),
            self.num_train_timesteps,
            n,
            int(self.config.get("steps_offset", 0)),
            "skip_last",
            self._last_timestep(),
        )
        special = self._special_sigmas(n)
        if special is None:
            sigmas = interp_sigmas(timesteps, self.train_sigmas)
        else:
            sigmas, timesteps, rounded = special
            timesteps = timesteps.round() if rounded else timesteps
        if self.config.get("final_sigmas_type", "sigma_min") == "zero":
            last = 0.0
        elif special is not None and self.final_sigma_from_schedule:
            last = sigmas[-1]
        else:
            last = self.train_sigmas[0]
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return Schedule(timesteps.astype(np.int64), n, sigmas)

    def _entry(self, index: int, timestep: Any, sigma: float, needs_noise: bool, coefs: Any) -> Entry:
        p = level(sigma)
        return Entry(index, int(timestep), None, (p.alpha, p.sigma), needs_noise, coefs)

    def _convert(self, model_output: Array, sample: Array, at: AlphaParam, data: bool) -> Array:
        """diffusers' ``convert_model_output``: the model output as x0 (``data``) or as epsilon.

        x0 is thresholded when configured; epsilon then goes through a thresholded x0.
        """
        if data:
            return self.process_x0(at.x0(self.prediction_type, model_output, sample))
        eps = at.eps(self.prediction_type, model_output, sample)
        if self.process_x0.threshold is not None:
            x0 = self.process_x0(at.x0("epsilon", eps, sample))
            eps = (sample - at.alpha * x0) / at.sigma
        return eps

    def _remember(self, state: History, converted: Array) -> list:
        keep = self.solver_order - 1
        state.outputs = [*state.outputs[-keep:], converted] if keep else [converted]
        return state.outputs
