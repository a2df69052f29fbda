"""DPM-Solver++ multistep on the EDM parametrisation (diffusers' ``EDMDPMSolverMultistepScheduler``)."""

from __future__ import annotations

import numpy as np

from . import f32
from .base import Schedule
from .config import SchedulerConfigError, check_choice
from .dpm_solver import DPMSolverMultistepScheduler
from .edm_euler import EDM_DEFAULTS, EDMParam, EDMScheduler
from .multistep import THRESHOLD_DEFAULTS
from .prediction import X0Processor


def _edm_log_snr(sigma: float) -> np.float32:
    """``log(alpha_t) - log(sigma_t)`` with ``alpha_t = 1`` (EDM inputs are preconditioned)."""
    return f32.F(0.0) - f32.log(sigma)


def _edm_alpha_sigma(sigma: float) -> tuple[np.float32, np.float32]:
    return f32.F(1.0), f32.F(sigma)


class EDMDPMSolverMultistepScheduler(EDMScheduler, DPMSolverMultistepScheduler):
    """DPM-Solver++ (2M by default, SDE and 3M variants) with ``alpha_t = 1, sigma_t = sigma``."""

    class_name = "EDMDPMSolverMultistepScheduler"
    defaults = {
        **EDM_DEFAULTS,
        "solver_order": 2,
        **THRESHOLD_DEFAULTS,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
    }
    ramp_float64 = False

    def _setup(self) -> None:
        EDMScheduler._setup(self)
        name = self.class_name
        algorithm = "dpmsolver++" if self.config["algorithm_type"] == "deis" else self.config["algorithm_type"]
        check_choice(name, "algorithm_type", algorithm, ("dpmsolver++", "sde-dpmsolver++"))
        solver = self.config["solver_type"]
        solver = "midpoint" if solver in ("logrho", "bh1", "bh2") else solver
        check_choice(name, "solver_type", solver, ("midpoint", "heun"))
        self.solver_order = int(self.config["solver_order"])
        if self.solver_order not in (1, 2, 3):
            raise SchedulerConfigError(f"{name}: solver_order={self.solver_order} is not supported; allowed: 1, 2, 3")
        if algorithm == "sde-dpmsolver++" and self.solver_order == 3:
            raise SchedulerConfigError(
                f"{name}: config key 'solver_order'=3 is not supported with algorithm_type='sde-dpmsolver++' "
                f"(diffusers has no third-order SDE update); use solver_order<=2"
            )
        self.algorithm, self.solver_type = algorithm, solver
        self.process_x0 = X0Processor.from_config(self.config)
        self.parametrisation = (
            _edm_log_snr,
            _edm_alpha_sigma,
            lambda s: EDMParam.of(s, self.sigma_data, self.prediction_type),
        )

    def _schedule(self, num_inference_steps: int) -> Schedule:
        last = float(self.config["sigma_min"]) if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        return self.edm_schedule(num_inference_steps, last)
