"""UniPC multistep predictor-corrector (diffusers' ``UniPCMultistepScheduler``)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import f32
from .base import Entry, Schedule
from .betas import BETA_DEFAULTS
from .config import check_choice
from .multistep import History, MultistepScheduler, alpha_sigma, level, log_snr, require_finite
from .ops import Array
from .prediction import AlphaParam


class _Update(NamedTuple):
    """One UniP / UniC update.

    ``ratio * x - phi * m0 - g * (sum_k rho_k (m_k - m0) / r_k [+ rho_t (m_t - m0)])``.
    """

    ratio: float
    phi: float
    g: float
    rks: tuple[float, ...]
    rhos: tuple[float, ...]
    """Predictor: one per remembered older output; corrector: plus a last one for the new model output."""

    def apply(self, x: Array, m0: Array, older: list, current: Array | None = None) -> Array:
        out = self.ratio * x - self.phi * m0
        res = None
        for rho, rk, mi in zip(self.rhos, self.rks, older, strict=False):
            term = rho * ((mi - m0) / rk)
            res = term if res is None else res + term
        if current is not None:
            term = self.rhos[-1] * (current - m0)
            res = term if res is None else res + term
        return out if res is None else out - self.g * res


class _Coefs(NamedTuple):
    level: AlphaParam
    corrector: _Update | None
    predictor: _Update


class UniPCMultistepScheduler(MultistepScheduler):
    """UniC corrects the previous prediction with the new model output, then UniP predicts the next sample."""

    class_name = "UniPCMultistepScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "solver_p": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
    }
    unsupported_flags = ("use_flow_sigmas", "use_dynamic_shifting", "shift_terminal", "solver_p")
    final_sigma_from_schedule = True

    def _setup(self) -> None:
        super()._setup()
        solver = self.config["solver_type"]
        self.solver_type = "bh2" if solver in ("midpoint", "heun", "logrho") else solver
        check_choice(self.class_name, "solver_type", self.solver_type, ("bh1", "bh2"))
        self.predict_x0 = bool(self.config["predict_x0"])
        self.disabled = frozenset(int(i) for i in self.config["disable_corrector"] or ())

    def _orders(self, total: int, begin: int, end: int) -> list[int]:
        so, lower_final = self.solver_order, bool(self.config["lower_order_final"])
        orders = []
        for j in range(begin, end):
            order = min(so, total - j) if lower_final else so
            orders.append(min(order, min(j - begin, so) + 1))
        return orders

    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> list[Entry]:
        sig = schedule.sigmas
        orders = self._orders(len(schedule.timesteps), begin, end)
        out = []
        for j in range(begin, end):
            r = j - begin
            corrector = None
            if r > 0 and j - 1 not in self.disabled:
                corrector = self._update(sig, j - 1, orders[r - 1], corrector=True)
            coefs = _Coefs(level(sig[j]), corrector, self._update(sig, j, orders[r], corrector=False))
            out.append(self._entry(j, schedule.timesteps[j], sig[j], False, coefs))
        return out

    def _update(self, sig: np.ndarray, j: int, order: int, corrector: bool) -> _Update:
        """The update from ``sig[j]`` to ``sig[j + 1]`` using ``order`` model outputs, in float32."""
        (alpha_t, sigma_t), (alpha_0, sigma_0) = alpha_sigma(sig[j + 1]), alpha_sigma(sig[j])
        lam0 = log_snr(sig[j])
        with np.errstate(all="ignore"):
            h = log_snr(sig[j + 1]) - lam0
            rks = [(log_snr(sig[j - i]) - lam0) / h for i in range(1, order)] + [f32.F(1.0)]
            hh = -h if self.predict_x0 else h
            h_phi_1 = f32.expm1(hh)
            h_phi_k = h_phi_1 / hh - 1
            b_h = hh if self.solver_type == "bh1" else f32.expm1(hh)
            factorial, rows, b = 1, [], []
            for i in range(1, order + 1):
                rows.append([_power(rk, i - 1) for rk in rks])
                b.append(h_phi_k * factorial / b_h)
                factorial *= i + 1
                h_phi_k = h_phi_k / hh - 1 / factorial
            if corrector:
                rhos = [f32.F(0.5)] if order == 1 else _solve(rows, b)
            elif order == 1:
                rhos = []
            elif order == 2:
                rhos = [f32.F(0.5)]
            else:
                rhos = _solve([r[:-1] for r in rows[:-1]], b[:-1])
            scale = alpha_t if self.predict_x0 else sigma_t
            ratio = sigma_t / sigma_0 if self.predict_x0 else alpha_t / alpha_0
            update = _Update(
                float(ratio),
                float(scale * h_phi_1),
                float(scale * b_h),
                tuple(map(float, rks[:-1])),
                tuple(map(float, rhos)),
            )
        require_finite(
            self.class_name,
            [update.ratio, update.phi, update.g, *update.rks, *update.rhos],
            f"step {j} has non-finite coefficients, so diffusers returns NaN there; with "
            f"final_sigmas_type='zero' use solver_type='bh2', predict_x0=True and lower_order_final=True, or "
            f"final_sigmas_type='sigma_min'",
        )
        return update

    def _step(
        self, entry: Entry, state: History, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        c: _Coefs = entry.coefs
        converted = self._convert(model_output, sample, c.level, self.predict_x0)
        if c.corrector is not None:
            older = state.outputs[-2::-1]
            sample = c.corrector.apply(state.last_sample, state.outputs[-1], older, converted)
        outputs = self._remember(state, converted)
        state.last_sample = sample
        prev = c.predictor.apply(sample, outputs[-1], outputs[-2::-1])
        return prev, (converted if self.predict_x0 else None)


def _power(x: np.float32, k: int) -> np.float32:
    """``torch.pow(x, k)`` for ``k`` in 0..2 (torch squares by multiplying)."""
    return f32.F(1.0) if k == 0 else x if k == 1 else x * x


def _solve(rows: list, b: list) -> list:
    """Solve the small float32 system for the UniPC ``rho`` weights (``torch.linalg.solve`` in diffusers)."""
    return list(np.linalg.solve(np.array(rows, dtype=np.float32), np.array(b, dtype=np.float32)))
