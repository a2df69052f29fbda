"""UNet FLOP counting from ONNX Runtime's profile: exact on hand-built graphs and equal to torch's count."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.flops import count_unet, last_run, node_flops, profile_graph, summarize_profile, unet_feeds


def test_node_flops_formulas() -> None:
    # Conv: 2 * |out| * Cin/groups * kh * kw
    assert node_flops("Conv", [[1, 3, 8, 8], [16, 3, 3, 3], [16]], [[1, 16, 8, 8]]) == 2 * 16 * 64 * 27
    assert node_flops("FusedConv", [[2, 8, 4, 4], [8, 1, 3, 3]], [[2, 8, 4, 4]]) == 2 * 256 * 9  # depthwise
    # MatMul: 2 * |out| * K, batched and with a pre-packed (absent) weight
    assert node_flops("MatMul", [[2, 4, 16, 8], [2, 4, 8, 32]], [[2, 4, 16, 32]]) == 2 * (2 * 4 * 16 * 32) * 8
    assert node_flops("MatMul", [[2, 77, 32]], [[2, 77, 64]]) == 2 * 2 * 77 * 64 * 32
    assert node_flops("Gemm", [[2, 32], [128]], [[2, 128]]) == 2 * 256 * 32
    assert node_flops("Add", [[2, 3]], [[2, 3]]) == 0
    assert node_flops("Conv", [[1, 3, 8, 8]], [[1, 16, 8, 8]]) == 0  # no weight shape: not counted
    assert node_flops("MatMul", [], []) == 0


def _event(op: str, inputs: list[list[int]], outputs: list[list[int]], dur: int, ts: int) -> dict[str, Any]:
    return {"cat": "Node", "name": f"n{ts}_kernel_time", "dur": dur, "ts": ts,
            "args": {"op_name": op, "input_type_shape": [{"float": s} for s in inputs],
                     "output_type_shape": [{"float": s} for s in outputs]}}


def test_summarize_profile_and_last_run() -> None:
    events = [
        {"name": "model_run", "ts": 0}, _event("MatMul", [[4, 8]], [[4, 16]], 100, 1),
        {"name": "model_run", "ts": 10}, _event("MatMul", [[4, 8]], [[4, 16]], 30, 11),
        _event("Add", [[4, 16]], [[4, 16]], 10, 12), {"cat": "Node", "name": "x_fence_before", "dur": 5, "ts": 13},
    ]
    whole = summarize_profile(events)
    assert whole.flops == 2 * 2 * 64 * 8
    last = summarize_profile(last_run(events))
    assert last.flops == 2 * 64 * 8 and dict(last.flops_by_op) == {"MatMul": 1024}
    assert last.kernel_seconds == pytest.approx(40e-6)
    assert last.time_shares() == pytest.approx({"MatMul": 0.75, "Add": 0.25})
    assert last.time_shares(top=1) == pytest.approx({"MatMul": 0.75, "other": 0.25})


def test_profile_graph_counts_a_built_graph(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3), dtype=np.float32), "w")
    m = numpy_helper.from_array(rng.standard_normal((16, 5), dtype=np.float32), "m")
    shape = numpy_helper.from_array(np.array([1, 8, 16], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Reshape", ["r", "shape"], ["f"]),
         helper.make_node("MatMul", ["f", "m"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5])], [w, m, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    feeds = {"x": rng.standard_normal((1, 3, 4, 4), dtype=np.float32)}
    conv, matmul = 2 * (8 * 16) * 27, 2 * (8 * 5) * 16
    assert profile_graph(path, feeds, level="basic", runs=2).flops == conv + matmul
    # the served level's NCHWc layout pads channels (3 -> 8 here): more executed than the architecture's FLOPs
    assert profile_graph(path, feeds, level="all").flops >= conv + matmul
    assert not list(tmp_path.glob("*flops*.json")), "the profile file is removed"


def test_unet_flops_equal_torch_flop_counter(tiny_folder: Callable[[str], Path],
                                             tiny_source: Callable[[str], Any]) -> None:
    """Same count as torch.utils.flop_counter on the diffusers UNet (attention in bmm form, as the ONNX graph)."""
    torch = pytest.importorskip("torch")
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    folder = tiny_folder("tiny-sd15")
    counted = count_unet(folder, batch=1, height=64, width=64)
    feeds = unet_feeds(folder, 1, 64, 64)
    assert counted["rows"] == 2 and feeds["sample"].shape == (2, 4, 8, 8)
    unet = tiny_source("tiny-sd15").pipe.unet
    original = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(*(torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states")))
    finally:
        unet.set_attn_processor(original)
    assert counted["flops"] == counter.get_total_flops()
    assert set(counted["flops_by_op"]) <= {"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul"}
    assert sum(counted["time_shares"].values()) == pytest.approx(1.0)
