"""Training noise schedules (betas and cumulative alphas) in float32, computed as diffusers computes them."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .config import SchedulerConfigError, check_choice

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
"""The beta schedules all the diffusers schedulers handled here accept; a few accept more."""

BETA_DEFAULTS: Mapping[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}
"""The training-schedule keys and the defaults most diffusers scheduler classes share."""


def _alpha_bar_fn(kind: str) -> Callable[[float], float]:
    if kind == "cosine":
        return lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    if kind == "exp":
        return lambda t: math.exp(t * -12.0)

    def laplace(t: float) -> float:
        lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
        snr = math.exp(lmb)
        return math.sqrt(snr / (1 + snr))

    return laplace


def betas_for_alpha_bar(
    num_train_timesteps: int, kind: str = "cosine", max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous ``alpha_bar(t)`` into betas (diffusers' ``betas_for_alpha_bar``)."""
    fn = _alpha_bar_fn(kind)
    n = num_train_timesteps
    betas = [min(1 - fn((i + 1) / n) / fn(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def linspace32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` bit for bit.

    torch's CPU kernel computes ``start + step * i`` for the first half and ``end - step * (n - 1 - i)`` for
    the second, in float32 with fused multiply-adds; a float64 product of two float32 values is exact, so one
    float64 add then one rounding reproduces the fused result (numpy's float64 ``linspace`` differs by up to
    one ulp).
    """
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s], dtype=np.float32)
    step = np.float64((e - s) / np.float32(n - 1))
    i = np.arange(n)
    half = n // 2
    head = step * i[:half].astype(np.float32) + np.float64(s)
    tail = -step * (n - 1 - i[half:]).astype(np.float32) + np.float64(e)
    return np.concatenate([head, tail]).astype(np.float32)


def make_betas(
    class_name: str, config: Mapping[str, Any], extra_schedules: tuple[str, ...] = ()
) -> np.ndarray:
    """Betas from ``trained_betas`` or ``beta_schedule`` / ``beta_start`` / ``beta_end`` (float32)."""
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
        if betas.ndim != 1 or betas.shape[0] != n:
            raise SchedulerConfigError(
                f"{class_name}: trained_betas has shape {betas.shape}, expected ({n},) = num_train_timesteps"
            )
        return betas
    schedule = config["beta_schedule"]
    check_choice(class_name, "beta_schedule", schedule, BETA_SCHEDULES + extra_schedules)
    start, end = float(config["beta_start"]), float(config["beta_end"])
    if schedule == "linear":
        return linspace32(start, end, n)
    if schedule == "scaled_linear":
        return linspace32(start**0.5, end**0.5, n) ** 2
    if schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n, "cosine")
    if schedule == "sigmoid":
        x = linspace32(-6.0, 6.0, n)
        sig = (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
        return sig * np.float32(end - start) + np.float32(start)
    return betas_for_alpha_bar(n, schedule)  # "exp" or "laplace"


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (arXiv 2305.08891, Algorithm 1), in float32 as diffusers does."""
    alphas_cumprod = cumprod32(np.float32(1.0) - betas)
    sqrt_ab = np.sqrt(alphas_cumprod)
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def cumprod32(x: np.ndarray) -> np.ndarray:
    """Cumulative product accumulated in float64 and stored as float32, like ``torch.cumprod`` on CPU."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def alphas_cumprod(
    class_name: str,
    config: Mapping[str, Any],
    *,
    extra_schedules: tuple[str, ...] = (),
    zero_snr_floor: bool = False,
) -> np.ndarray:
    """Cumulative alphas (float32, read-only), honouring ``rescale_betas_zero_snr`` where the class has it.

    ``zero_snr_floor``: after rescaling, set the last value to ``2**-24`` so sigmas stay finite (the
    sigma-based diffusers schedulers do this; the DDPM-style ones keep the exact zero).
    """
    betas = make_betas(class_name, config, extra_schedules)
    rescale = bool(config.get("rescale_betas_zero_snr", False))
    if rescale:
        betas = rescale_zero_terminal_snr(betas)
    out = cumprod32(np.float32(1.0) - betas)
    if rescale and zero_snr_floor:
        out[-1] = 2.0**-24
    out.flags.writeable = False
    return out


def train_sigmas(alphas_cumprod_: np.ndarray) -> np.ndarray:
    """``sqrt((1 - a) / a)`` per training timestep, ascending in t (float32)."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod_) / alphas_cumprod_)
