"""float32 scalar math, so precomputed coefficients round like diffusers' 0-d float32 tensor arithmetic.

diffusers computes step coefficients with float32 scalar tensors; where those formulas cancel catastrophically
(e.g. ``sigma_down`` of Euler ancestral at zero-SNR sigmas, DDPM's ``1 - a_t / a_prev`` near t = 0,
DPM-Solver's log-SNR differences) float64 coefficients would be *more* accurate than diffusers and visibly
different. Mixing these ``numpy.float32`` scalars with Python numbers keeps float32 (NEP 50), as torch does
with its scalars.
"""

from __future__ import annotations

import numpy as np

F = np.float32


def sqrt(x: float) -> np.float32:
    """Correctly rounded float32 square root (torch's ``x ** 0.5`` and ``.sqrt()``)."""
    return np.sqrt(F(x))


def _via64(fn: np.ufunc, x: float) -> np.float32:
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return F(fn(np.float64(x)))


def exp(x: float) -> np.float32:
    """float32 ``exp`` (double evaluation, then one rounding: glibc's expf result)."""
    return _via64(np.exp, x)


def expm1(x: float) -> np.float32:
    """float32 ``expm1``."""
    return _via64(np.expm1, x)


def log(x: float) -> np.float32:
    """float32 ``log``; ``log(0) = -inf`` as in torch."""
    return _via64(np.log, x)
