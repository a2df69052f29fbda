"""The beta distribution's inverse CDF in numpy (float64), for beta sigma spacing without scipy at runtime."""

from __future__ import annotations

import math

import numpy as np

_TINY = 1e-300
_EPS = 3e-16


def _continued_fraction(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """The continued fraction of the incomplete beta function (modified Lentz), vectorised over ``x``."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0

    def guard(v: np.ndarray) -> np.ndarray:
        """Keep Lentz's denominators away from zero."""
        return np.where(np.abs(v) < _TINY, _TINY, v)

    c = np.ones_like(x)
    d = 1.0 / guard(1.0 - qab * x / qap)
    h = d.copy()
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 / guard(1.0 + aa * d)
        c = guard(1.0 + aa / c)
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 / guard(1.0 + aa * d)
        c = guard(1.0 + aa / c)
        delta = d * c
        h *= delta
        if np.all(np.abs(delta - 1.0) < _EPS):
            break
    return h


def _front(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """``x^a (1 - x)^b / B(a, b)``."""
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    with np.errstate(divide="ignore"):
        return np.exp(a * np.log(x) + b * np.log1p(-x) - log_beta)


def beta_cdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """The regularised incomplete beta function ``I_x(a, b)`` (the beta distribution's CDF), float64."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    inner = (x > 0) & (x < 1)
    out = np.where(x >= 1, 1.0, 0.0)
    xi = x[inner]
    direct = xi < (a + 1.0) / (a + b + 2.0)
    res = np.empty_like(xi)
    if direct.any():
        xd = xi[direct]
        res[direct] = _front(a, b, xd) * _continued_fraction(a, b, xd) / a
    if (~direct).any():
        xr = 1.0 - xi[~direct]
        res[~direct] = 1.0 - _front(b, a, xr) * _continued_fraction(b, a, xr) / b
    out[inner] = res
    return out


def beta_ppf(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """The beta distribution's quantile function (``scipy.stats.beta.ppf``) to float64 precision.

    Newton's method on the CDF, kept inside a bisection bracket so it always converges.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"beta distribution parameters must be positive, got a={a!r}, b={b!r}")
    q = np.asarray(q, dtype=np.float64)
    if np.any((q < 0) | (q > 1)) or not np.all(np.isfinite(q)):
        raise ValueError(f"quantiles must lie in [0, 1], got {q!r}")
    lo, hi = np.zeros_like(q), np.ones_like(q)
    x = np.full_like(q, a / (a + b))
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    for _ in range(200):
        f = beta_cdf(x, a, b) - q
        lo, hi = np.where(f < 0, x, lo), np.where(f > 0, x, hi)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            pdf = np.exp((a - 1) * np.log(x) + (b - 1) * np.log1p(-x) - log_beta)
            step = x - f / pdf
        bisect = 0.5 * (lo + hi)
        nxt = np.where(np.isfinite(step) & (step > lo) & (step < hi), step, bisect)
        nxt = np.where(f == 0, x, nxt)
        done = np.abs(nxt - x) <= 1e-300 + 2e-15 * np.abs(x)
        x = nxt
        if np.all(done):
            break
    return np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, x))
