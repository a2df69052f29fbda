"""A stand-in for diffusers' ``BrownianTreeNoiseSampler`` that builds its Brownian path from injected draws.

diffusers' DPM++ SDE asks its sampler for normalised increments ``(W(b) - W(a)) / sqrt(|b - a|)`` of one
Brownian motion over sigma, on descending sigmas. This fake builds that path point by point: the first sigma
asked for is ``W = 0``; each new, lower point ``p`` below the lowest known ``q`` is ``W(q) + sqrt(q - p) * draw()``
with ``draw(shape)`` the next injected standard-normal array. It is written independently of the scheduler's
closed form, so comparing both checks that form (and the draw order) against the Brownian construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def brownian_sampler(draw: Callable[[tuple], Any]) -> type:
    """A ``BrownianTreeNoiseSampler`` replacement class whose new path points consume ``draw(shape)`` in order."""

    class BrownianPath:
        def __init__(self, x: Any, sigma_min: float, sigma_max: float, seed: Any = None, **_: Any) -> None:
            self.shape = tuple(x.shape)
            self.points: dict[float, np.ndarray] = {}

        def _value(self, sigma: float) -> np.ndarray:
            if sigma not in self.points:
                if not self.points:
                    self.points[sigma] = np.zeros(self.shape)
                else:
                    lowest = min(self.points)
                    assert sigma < lowest, f"the path is built downwards: {sigma} is not below {lowest}"
                    step = np.asarray(draw(self.shape), np.float64) * math.sqrt(lowest - sigma)
                    self.points[sigma] = self.points[lowest] + step
            return self.points[sigma]

        def __call__(self, sigma: Any, sigma_next: Any) -> torch.Tensor:
            a, b = float(sigma), float(sigma_next)
            wa = self._value(a)
            wb = self._value(b)
            return torch.from_numpy(((wb - wa) / math.sqrt(abs(b - a))).astype(np.float32))

    return BrownianPath
