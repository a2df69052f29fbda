"""Summary statistics of repeated timings: median and spread, robust to a noisy machine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Summary:
    """Median and spread of n samples. ``spread`` is the interquartile range relative to the median."""

    n: int
    median: float
    mean: float
    min: float
    max: float
    p25: float
    p75: float
    stdev: float

    @property
    def iqr(self) -> float:
        """Interquartile range p75 - p25."""
        return self.p75 - self.p25

    @property
    def spread(self) -> float:
        """IQR / median (0 when the median is 0)."""
        return self.iqr / self.median if self.median else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the fields plus iqr and spread."""
        return {**asdict(self), "iqr": self.iqr, "spread": self.spread}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        """Inverse of ``to_dict`` (derived keys are ignored)."""
        return cls(**{k: data[k] for k in ("n", "median", "mean", "min", "max", "p25", "p75", "stdev")})

    def scaled(self, factor: float) -> Summary:
        """Every statistic times ``factor`` (e.g. seconds -> milliseconds)."""
        return Summary(self.n, self.median * factor, self.mean * factor, self.min * factor, self.max * factor,
                       self.p25 * factor, self.p75 * factor, self.stdev * abs(factor))


def summarize(values: Sequence[float]) -> Summary:
    """Summary of at least one sample; stdev is the sample standard deviation (0 for one sample)."""
    data = np.asarray(values, dtype=np.float64).ravel()
    if data.size == 0:
        raise ValueError("cannot summarize zero samples")
    if np.isnan(data).any():
        raise ValueError(f"cannot summarize NaN samples ({int(np.isnan(data).sum())} of {data.size})")
    p25, median, p75 = (float(p) for p in np.percentile(data, [25, 50, 75]))  # linear interpolation
    stdev = float(data.std(ddof=1)) if data.size > 1 else 0.0
    return Summary(int(data.size), median, float(data.mean()), float(data.min()), float(data.max()), p25, p75, stdev)


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is not positive."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference
