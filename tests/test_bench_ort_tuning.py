"""ONNX Runtime tuning experiment: variants build the intended SessionOptions, IO binding computes the same result,
and the recommendation needs a clear, non-overlapping win."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from harness.ort_tuning import BY_NAME, VARIANTS, combine, measure_variant, recommend, runner, session_options
from harness.stats import summarize


def test_every_variant_changes_one_thing() -> None:
    assert VARIANTS[0].name == "baseline" and len(BY_NAME) == len(VARIANTS)
    base = session_options(BY_NAME["baseline"])
    assert base.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_options(BY_NAME["intra_1"]).intra_op_num_threads == 1
    assert session_options(BY_NAME["opt_basic"]).graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    parallel = session_options(BY_NAME["parallel_inter_2"])
    assert parallel.execution_mode == ort.ExecutionMode.ORT_PARALLEL and parallel.inter_op_num_threads == 2
    assert session_options(BY_NAME["arena"]).enable_cpu_mem_arena is True
    assert session_options(BY_NAME["no_mem_pattern"]).enable_mem_pattern is False
    spin = session_options(BY_NAME["no_spinning"])
    assert spin.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    covered = {k for v in VARIANTS for k in v.options} | {k for v in VARIANTS for k in v.config}
    assert {"intra_op_num_threads", "inter_op_num_threads", "graph_optimization_level", "enable_cpu_mem_arena",
            "enable_mem_pattern", "execution_mode"} <= covered
    assert any(v.io_binding for v in VARIANTS)


@pytest.fixture(scope="module")
def matmul_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 16), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("graph") / "g.onnx"
    onnx.save(model, path)
    return path


def test_io_binding_matches_plain_run(matmul_graph: Path) -> None:
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 32), dtype=np.float32)}
    session = ort.InferenceSession(str(matmul_graph), providers=["CPUExecutionProvider"])
    plain = runner(session, feeds, io_binding=False)()[0]
    bound = runner(session, feeds, io_binding=True)
    np.testing.assert_array_equal(bound()[0], plain)
    np.testing.assert_array_equal(bound()[0], plain)  # the binding is reusable run after run


@pytest.mark.parametrize("name", ["baseline", "io_binding", "opt_disable", "arena"])
def test_measure_variant(matmul_graph: Path, name: str) -> None:
    feeds = {"x": np.ones((2, 32), np.float32)}
    result = measure_variant(BY_NAME[name], matmul_graph, feeds, repeats=3)
    assert len(result["times"]) == 3 and all(t > 0 for t in result["times"])
    assert result["create_s"] > 0 and result["peak_rss_mib"] > 0


def _rounds(times: list[float], rss: float = 100.0) -> list[dict[str, Any]]:
    return [{"create_s": 0.1, "first_s": 0.2, "times": times, "peak_rss_mib": rss}]


def test_combine_and_recommend() -> None:
    base = combine("baseline", _rounds([1.0, 1.0, 1.1, 0.9]), None)
    fast = combine("intra_1", _rounds([0.5, 0.52, 0.48, 0.5], 90.0), base)
    noisy = combine("arena", _rounds([0.2, 2.0, 0.3, 1.8]), base)
    slow = combine("opt_disable", _rounds([2.0, 2.1]), base)
    failed = combine("io_binding", [{"error": "boom"}], base)
    assert fast["speedup_vs_baseline"] == pytest.approx(2.0) and fast["rss_vs_baseline"] == pytest.approx(0.9)
    assert fast["run_s"] == summarize([0.5, 0.52, 0.48, 0.5]).to_dict()
    assert failed == {"variant": "io_binding", "status": "failed", "reason": "boom"}
    assert recommend([base, fast, noisy, slow, failed]) == ["intra_1"]
    assert recommend([fast]) == []
