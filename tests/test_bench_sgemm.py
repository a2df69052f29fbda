"""The sgemm ceiling measurement: formula, sanity of measured GFLOP/s, and the OpenBLAS pins left out."""

from __future__ import annotations

import os

import numpy as np
import pytest

from harness import environment, sgemm


def test_gflops_formula() -> None:
    assert sgemm.gflops(1000, 2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        sgemm.gflops(10, 0.0)


def test_time_calls_counts() -> None:
    calls = []
    times = sgemm.time_calls(lambda: calls.append(1), repeats=3, warmups=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_backends_compute_a_real_product() -> None:
    a, b = sgemm._matrices(64)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(sgemm.numpy_call(64)(), expected, rtol=1e-4, atol=1e-3)
    pytest.importorskip("onnx")
    np.testing.assert_allclose(sgemm.ort_call(64)()[0], expected, rtol=1e-4, atol=1e-3)


def test_measure_is_plausible() -> None:
    result = sgemm.measure(["numpy", "onnxruntime"], sizes=[256], repeats=3)
    peak_bound = 400.0 * (os.cpu_count() or 1)  # > any core's fp32 FMA peak (2 AVX-512 FMA units at 6 GHz)
    for name, r in result["backends"].items():
        if r["status"] != "ok":
            assert r["reason"], name
            continue
        assert 0.1 < r["gflops"] < peak_bound, (name, r)
        assert r["sizes"]["256"]["best_gflops"] >= r["sizes"]["256"]["median_gflops"]
    assert result["ceiling_gflops"] == max(r["gflops"] for r in result["backends"].values() if r["status"] == "ok")


def test_missing_backend_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sgemm.BACKENDS, "nothing", ("no_such_module_xyz", sgemm.numpy_call))
    result = sgemm.measure(["nothing"], sizes=[32], repeats=1)
    assert result["backends"]["nothing"] == {"status": "skipped", "reason": "no_such_module_xyz is not installed"}
    assert result["ceiling_gflops"] is None


def test_ceiling_runs_without_openblas_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert "OPENBLAS_CORETYPE" not in sgemm.clean_environ()
    result = sgemm.measure_ceiling(sizes=[128], repeats=2)
    assert result["unset_env"] == ["OPENBLAS_CORETYPE"] + (["OPENBLAS_L2_SIZE"] if "OPENBLAS_L2_SIZE" in os.environ
                                                            else [])
    assert result["ceiling_gflops"] > 0
    avx512 = "avx512f" in environment.cpu_flags()
    for blas in result["blas"]:  # threadpoolctl, when installed, names the kernel that ran: not the pinned one
        if blas["internal_api"] == "openblas" and avx512:
            assert blas["architecture"] != "Haswell", blas
