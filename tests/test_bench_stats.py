"""Benchmark statistics: summaries (numpy percentiles) and ratios, and bad input rejected."""

from __future__ import annotations

import numpy as np
import pytest

from harness.stats import Summary, ratio, summarize


def test_quartiles_interpolate_between_samples() -> None:
    s = summarize([3.0, 1.0, 7.5, 2.25, 9.0, 4.0])  # sorted 1, 2.25, 3, 4, 7.5, 9
    assert (s.p25, s.median, s.p75) == pytest.approx((2.4375, 3.5, 6.625))
    assert all(isinstance(v, float) for v in (s.p25, s.median, s.p75, s.mean, s.stdev, s.min))


def test_summarize_fields() -> None:
    data = [0.9, 1.0, 1.1, 1.2, 5.0]  # one outlier: the median and IQR ignore it, the mean does not
    s = summarize(data)
    assert s.n == 5
    assert s.median == pytest.approx(1.1)
    assert s.mean == pytest.approx(np.mean(data))
    assert s.stdev == pytest.approx(np.std(data, ddof=1))
    assert (s.min, s.max) == (0.9, 5.0)
    assert s.iqr == pytest.approx(0.2)
    assert s.spread == pytest.approx(0.2 / 1.1)


def test_summarize_single_sample_and_errors() -> None:
    s = summarize([2.0])
    assert (s.median, s.stdev, s.iqr) == (2.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError, match="NaN"):
        summarize([1.0, float("nan")])


def test_summary_round_trip_and_scaling() -> None:
    s = summarize([0.001, 0.002, 0.004])
    d = s.to_dict()
    assert d["iqr"] == pytest.approx(s.iqr) and d["spread"] == pytest.approx(s.spread)
    assert Summary.from_dict(d) == s
    ms = s.scaled(1e3)
    assert ms.median == pytest.approx(2.0) and ms.max == pytest.approx(4.0)
    assert ms.spread == pytest.approx(s.spread)


def test_ratio() -> None:
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None
