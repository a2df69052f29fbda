"""DPM-Solver(++) singlestep, orders 1-3 (diffusers' ``DPMSolverSinglestepScheduler``: DPM++ 2S / 3S)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .base import Entry, Schedule
from .betas import BETA_DEFAULTS
from .config import SchedulerConfigError
from .dpm_solver import DPMSolverMultistepScheduler, _weights, combine
from .multistep import SIGMA_FLAG_DEFAULTS, THRESHOLD_DEFAULTS, History, alpha_sigma, level, log_snr, require_finite
from .ops import Array
from .prediction import AlphaParam


class _Coefs(NamedTuple):
    level: AlphaParam
    order: int
    weights: tuple[float, ...]
    """Weights of the group's start sample, D0, D1 (or D1_1), D2 (as the order needs) and the noise."""
    ratios: tuple[float, ...]
    """Order 2: ``(1 / r0,)``; order 3: ``(1 / r0, 1 / r1, r0, r1, r0 - r1)``."""


def order_list(n: int, solver_order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """diffusers' ``get_order_list``: the order of each step, in groups ``1, 2[, 3]`` sharing one start sample."""
    pattern = list(range(1, solver_order + 1))
    groups, rest = divmod(n, solver_order)
    if not lower_order_final:
        orders = pattern * groups
    elif solver_order == 3 and rest == 0:
        orders = pattern * (groups - 1) + [1, 2, 1]
    elif solver_order == 2 and rest == 0:
        orders = pattern * (groups - 1) + [1, 1]
    else:
        orders = pattern * groups + list(range(1, rest + 1))
    if final_zero:
        orders[-1] = 1
    return orders


class DPMSolverSinglestepScheduler(DPMSolverMultistepScheduler):
    """Each group of ``solver_order`` steps restarts from its first sample, the others being intermediate points.

    diffusers switches ``lower_order_final`` on (permanently, in its config) when N is not a multiple of
    ``solver_order`` or ``final_sigmas_type`` is ``"zero"``; here it applies to that plan only.
    """

    class_name = "DPMSolverSinglestepScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        **THRESHOLD_DEFAULTS,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": False,
        **SIGMA_FLAG_DEFAULTS,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    karras_rounds_cosine = True

    def _setup(self) -> None:
        super()._setup()
        name = self.class_name
        if self.algorithm == "sde-dpmsolver":
            raise SchedulerConfigError(
                f"{name}: config key 'algorithm_type'='sde-dpmsolver' is not supported; allowed: "
                f"['dpmsolver++', 'sde-dpmsolver++', 'dpmsolver']"
            )
        if self.algorithm == "dpmsolver" and self.config["thresholding"]:
            raise SchedulerConfigError(
                f"{name}: config key 'thresholding'=True is not supported with algorithm_type='dpmsolver' "
                f"(diffusers indexes its tables with a missing timestep there); use algorithm_type='dpmsolver++'"
            )

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        n, so = len(schedule.timesteps), self.solver_order
        final_zero = self.config["final_sigmas_type"] == "zero"
        lower = bool(self.config["lower_order_final"]) or n % so != 0 or final_zero
        orders = order_list(n, so, lower, final_zero)
        noisy = self.algorithm.startswith("sde")
        out = []
        for j in range(begin, end):
            order = min(orders[j], j - begin + 1)
            coefs = self._group_coefs(schedule.sigmas, j, order)
            out.append(self._entry(j, schedule.timesteps[j], schedule.sigmas[j], noisy, coefs))
        return out

    def _group_coefs(self, sig: np.ndarray, j: int, order: int) -> _Coefs:
        lam_t = log_snr(sig[j + 1])
        lam = [log_snr(sig[j - k]) for k in range(order)]  # s0, s1, s2
        h = lam_t - lam[-1]
        midpoint = self.solver_type == "midpoint"
        with np.errstate(all="ignore"):
            w = _weights(self.algorithm, midpoint and order == 2, order, h, alpha_sigma(sig[j + 1]),
                         alpha_sigma(sig[j - order + 1]))
            ratios: tuple = ()
            if order == 2:
                ratios = (1.0 / ((lam[0] - lam[1]) / h),)
            elif order == 3:
                r0, r1 = (lam[0] - lam[2]) / h, (lam[1] - lam[2]) / h
                ratios = (1.0 / r0, 1.0 / r1, r0, r1, r0 - r1)
        used = w[1 : order + 1] if order < 3 or not midpoint else w[1:3]
        weights = (w[0], *used, w[4])
        require_finite(self.class_name, [*weights, *ratios], f"step {j} has non-finite coefficients")
        return _Coefs(level(sig[j]), order, tuple(map(float, weights)), tuple(map(float, ratios)))

    def _step(
        self, entry: Entry, state: History, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        converted, m = self._history(state, model_output, sample, c.level)
        if c.order == 1:
            state.last_sample = sample
        ds = [m[-c.order]]
        if c.order == 2:
            ds.append(c.ratios[0] * (m[-1] - m[-2]))
        elif c.order == 3:
            inv_r0, inv_r1, r0, r1, diff = c.ratios
            d1_0, d1_1 = inv_r1 * (m[-2] - m[-3]), inv_r0 * (m[-1] - m[-3])
            if self.solver_type == "midpoint":
                ds.append(d1_1)
            else:
                ds += [(r0 * d1_0 - r1 * d1_1) / diff, 2.0 * (d1_1 - d1_0) / diff]
        x0 = converted if self.algorithm.endswith("++") else None
        return combine(c.weights, state.last_sample, ds, noise), x0
