"""Model-output conversions (epsilon / v / sample -> x0 or epsilon) and x0 clipping / thresholding."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import f32
from .ops import Array, clip, dynamic_threshold


@dataclass(frozen=True)
class AlphaParam:
    """A noise level of ``x_t = alpha * x0 + sigma * eps`` (DDPM-style schedulers; DPM-Solver / UniPC)."""

    alpha: float
    sigma: float

    def x0(self, kind: str, model_output: Array, sample: Array) -> Array:
        """x0 from an ``epsilon`` / ``v_prediction`` / ``sample`` prediction."""
        if kind == "epsilon":
            return (sample - self.sigma * model_output) / self.alpha
        if kind == "v_prediction":
            return self.alpha * sample - self.sigma * model_output
        return model_output

    def eps(self, kind: str, model_output: Array, sample: Array) -> Array:
        """epsilon from an ``epsilon`` / ``v_prediction`` / ``sample`` prediction."""
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":
            return self.alpha * model_output + self.sigma * sample
        return (sample - self.alpha * model_output) / self.sigma


@dataclass(frozen=True)
class SigmaParam:
    """A noise level of ``x = x0 + sigma * eps`` (the k-diffusion parametrisation of Euler, Heun, LMS)."""

    sigma: float
    v_model: float
    """``-sigma / sqrt(sigma^2 + 1)``, the weight of a v-prediction in x0."""
    v_div: float
    """``sigma^2 + 1``, the divisor of the sample in x0 from a v-prediction."""

    @classmethod
    def of(cls, sigma: float) -> SigmaParam:
        """The level ``sigma`` with its v-prediction weights, rounded as float32 like diffusers' tensors."""
        s = f32.F(sigma)
        return cls(float(s), float(-s / f32.sqrt(s * s + 1)), float(s * s + 1))

    def x0(self, kind: str, model_output: Array, sample: Array) -> Array:
        """x0 from an ``epsilon`` / ``v_prediction`` / ``sample`` (``original_sample``) prediction."""
        if kind == "epsilon":
            return sample - self.sigma * model_output
        if kind == "v_prediction":
            return model_output * self.v_model + sample / self.v_div
        return model_output

    def derivative(self, x0: Array, sample: Array) -> Array:
        """``(x - x0) / sigma``: dx/dsigma of the probability-flow ODE at this level (Euler, Heun, LMS)."""
        return (sample - x0) / self.sigma


@dataclass(frozen=True)
class X0Processor:
    """diffusers' treatment of a predicted x0: dynamic thresholding, else clipping, else nothing."""

    threshold: tuple[float, float] | None = None
    clip_range: float | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> X0Processor:
        """Read ``thresholding`` / ``dynamic_thresholding_ratio`` / ``sample_max_value`` / ``clip_sample`` /
        ``clip_sample_range`` where the class has them."""
        if config.get("thresholding"):
            return cls(
                threshold=(float(config["dynamic_thresholding_ratio"]), float(config["sample_max_value"]))
            )
        if config.get("clip_sample"):
            return cls(clip_range=float(config["clip_sample_range"]))
        return cls()

    def __call__(self, x0: Array) -> Array:
        if self.threshold is not None:
            return dynamic_threshold(x0, *self.threshold)
        if self.clip_range is not None:
            return clip(x0, -self.clip_range, self.clip_range)
        return x0
