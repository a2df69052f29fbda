"""Sigma schedules (interpolated, Karras, exponential) and the base of the k-diffusion style schedulers."""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import numpy as np

from . import f32
from .base import Entry, Scheduler
from .beta_dist import beta_ppf
from .betas import BETA_DEFAULTS, alphas_cumprod, train_sigmas
from .config import SchedulerConfigError, check_choice
from .timesteps import spaced_timesteps

SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


SIGMA_SCHEDULER_DEFAULTS: dict[str, Any] = {
    **BETA_DEFAULTS,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}
"""The ``__init__`` defaults diffusers' sigma schedulers share (LMS, KDPM2 with its own beta range)."""


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Training sigmas linearly interpolated at (possibly fractional) timesteps, float64 as in diffusers."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas: uniform in ``sigma ** (1 / rho)`` from ``sigma_max`` to ``sigma_min``."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Sigmas uniform in log space from ``sigma_max`` to ``sigma_min``."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


@functools.lru_cache(maxsize=64)
def _beta_quantiles(n: int, a: float, b: float) -> np.ndarray:
    out = beta_ppf(1 - np.linspace(0, 1, n), a, b)
    out.flags.writeable = False
    return out


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """Beta-distributed sigmas (arXiv 2407.12173): ``sigma_min + ppf(1 - u) * (sigma_max - sigma_min)``.

    The quantiles are cached per step count (the inverse CDF costs tens of milliseconds; plans are per request).
    """
    return sigma_min + _beta_quantiles(n, a, b) * (sigma_max - sigma_min)


def spaced_sigmas(flag: str, sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """The inference sigmas of a sigma-spacing flag (Karras / exponential / beta), descending."""
    if flag == "use_karras_sigmas":
        return karras_sigmas(sigma_min, sigma_max, n)
    if flag == "use_exponential_sigmas":
        return exponential_sigmas(sigma_min, sigma_max, n)
    return beta_sigmas(sigma_min, sigma_max, n)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of ``sigmas``, interpolated in log-sigma (``_sigma_to_t``)."""
    sigmas = np.asarray(sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigmas.shape)


def sigma_bounds(scheduler: Scheduler, in_sigmas: np.ndarray) -> tuple[float, float]:
    """``(sigma_min, sigma_max)`` for Karras / exponential sigmas.

    The config's ``sigma_min`` / ``sigma_max`` when set (diffusers reads them even where they are not
    ``__init__`` keys of the class), else the ends of ``in_sigmas`` (descending).
    """

    def pick(key: str, fallback: float) -> float:
        value = scheduler.config.get(key, scheduler.hidden_config.get(key))
        return float(fallback) if value is None else float(value)

    return pick("sigma_min", in_sigmas[-1].item()), pick("sigma_max", in_sigmas[0].item())


def check_sigma_flags(scheduler: Scheduler) -> str | None:
    """Check the sigma-spacing flags (Karras / exponential / beta); return the one that is set."""
    chosen = [k for k in SIGMA_FLAGS if scheduler.config.get(k)]
    if len(chosen) > 1:
        raise SchedulerConfigError(f"{scheduler.class_name}: only one of {chosen} can be true")
    return chosen[0] if chosen else None


class SigmaScheduler(Scheduler):
    """Schedulers on ``x = x0 + sigma * eps``, model input ``x / sqrt(sigma^2 + 1)`` (Euler, Heun, LMS)."""

    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")
    extra_beta_schedules: ClassVar[tuple[str, ...]] = ()
    karras_reads_config_bounds: ClassVar[bool] = True
    """Whether Karras sigmas honour the config's ``sigma_min`` / ``sigma_max`` (LMS ignores them)."""

    def _setup(self) -> None:
        check_choice(
            self.class_name, "prediction_type", self.config["prediction_type"], self.prediction_types
        )
        self.prediction_type: str = self.config["prediction_type"]
        self.alphas_cumprod = alphas_cumprod(
            self.class_name, self.config, extra_schedules=self.extra_beta_schedules, zero_snr_floor=True
        )
        self.train_sigmas = train_sigmas(self.alphas_cumprod)
        self.train_sigmas.flags.writeable = False
        self.log_sigmas = np.log(self.train_sigmas)
        self.sigma_flag = check_sigma_flags(self)

    def _spaced(self, num_inference_steps: int) -> np.ndarray:
        return spaced_timesteps(
            self.class_name,
            self.config["timestep_spacing"],
            self.num_train_timesteps,
            num_inference_steps,
            int(self.config["steps_offset"]),
            "float",
        )

    def _converted(self, sigmas: np.ndarray, n: int, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Apply Karras / exponential / beta spacing to inference sigmas; returns ``(sigmas, timesteps)``."""
        if self.sigma_flag is None:
            return sigmas, timesteps
        karras = self.sigma_flag == "use_karras_sigmas"
        if karras and not self.karras_reads_config_bounds:
            lo, hi = sigmas[-1].item(), sigmas[0].item()
        else:
            lo, hi = sigma_bounds(self, sigmas)
        sigmas = spaced_sigmas(self.sigma_flag, lo, hi, n)
        return sigmas, sigma_to_t(sigmas, self.log_sigmas)

    def _init_noise_sigma(self, sigmas: np.ndarray) -> float:
        top = sigmas.max()
        return float(
            top if self.config["timestep_spacing"] in ("linspace", "trailing") else f32.sqrt(top * top + 1)
        )

    @staticmethod
    def _entry(index: int, timestep: Any, sigma: float, needs_noise: bool, coefs: Any) -> Entry:
        s = f32.F(sigma)
        return Entry(index, float(timestep), float(f32.sqrt(s * s + 1)), (1.0, float(s)), needs_noise, coefs)
