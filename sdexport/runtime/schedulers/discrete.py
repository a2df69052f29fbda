"""Shared base of the DDPM-style schedulers (DDPM, DDIM, PNDM, LCM): ``alphas_cumprod`` by timestep."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from . import f32
from .base import Entry, Schedule, Scheduler
from .betas import alphas_cumprod
from .config import SchedulerConfigError, check_choice
from .prediction import AlphaParam, X0Processor
from .timesteps import spaced_timesteps


class AlphaScheduler(Scheduler):
    """Schedulers on ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` over integer training timesteps."""

    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "sample", "v_prediction")
    extra_beta_schedules: ClassVar[tuple[str, ...]] = ()

    def _setup(self) -> None:
        check_choice(
            self.class_name, "prediction_type", self.config["prediction_type"], self.prediction_types
        )
        self.prediction_type: str = self.config["prediction_type"]
        self.alphas_cumprod = alphas_cumprod(
            self.class_name, self.config, extra_schedules=self.extra_beta_schedules
        )
        self.process_x0 = X0Processor.from_config(self.config)
        if "set_alpha_to_one" in self.config and not self.config["set_alpha_to_one"]:
            self.final_alpha_cumprod = self.alphas_cumprod[0]
        else:
            self.final_alpha_cumprod = f32.F(1.0)

    def alpha(self, t: int) -> np.float32:
        """``alphas_cumprod[t]``, or the final alpha (``set_alpha_to_one``) for ``t < 0``; float32."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    @staticmethod
    def param(alpha_cumprod: np.float32) -> AlphaParam:
        """The ``(sqrt(a), sqrt(1 - a))`` noise level of a cumulative alpha, rounded as diffusers does."""
        return AlphaParam(float(f32.sqrt(alpha_cumprod)), float(f32.sqrt(1 - alpha_cumprod)))

    def _schedule(self, num_inference_steps: int) -> Schedule:
        ts = spaced_timesteps(
            self.class_name,
            self.config["timestep_spacing"],
            self.num_train_timesteps,
            num_inference_steps,
            int(self.config["steps_offset"]),
            "int",
        )
        if len(ts) and int(np.max(ts)) >= self.num_train_timesteps:  # e.g. 1000 steps with steps_offset 1
            raise SchedulerConfigError(
                f"{self.class_name}: num_inference_steps={num_inference_steps} gives timestep {int(np.max(ts))}, "
                f"past the last training timestep {self.num_train_timesteps - 1} (this config's steps_offset / "
                f"timestep_spacing); use fewer steps"
            )
        return Schedule(ts, num_inference_steps)

    def _entry(self, index: int, timestep: Any, needs_noise: bool, coefs: Any) -> Entry:
        t = int(timestep)
        if not 0 <= t < self.num_train_timesteps:
            raise SchedulerConfigError(
                f"{self.class_name}: timestep {t} is outside the training range [0, "
                f"{self.num_train_timesteps}); check timestep_spacing / steps_offset"
            )
        p = self.param(self.alphas_cumprod[t])
        return Entry(index, t, None, (p.alpha, p.sigma), needs_noise, coefs)
