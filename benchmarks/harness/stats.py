"""Summary statistics of repeated timings: median and spread, robust to a noisy machine."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


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
    data = [float(v) for v in values]
    if not data:
        raise ValueError("cannot summarize zero samples")
    if any(math.isnan(v) for v in data):
        raise ValueError("cannot summarize NaN samples")
    n = len(data)
    mean = sum(data) / n
    var = sum((v - mean) ** 2 for v in data) / (n - 1) if n > 1 else 0.0
    return Summary(n, percentile(data, 50), mean, min(data), max(data), percentile(data, 25), percentile(data, 75),
                   math.sqrt(var))


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is not positive."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference
