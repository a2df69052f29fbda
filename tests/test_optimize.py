"""Graph passes: streamed fp16 conversion and external-data consolidation equal their in-memory counterparts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sdexport.export import optimize
from sdexport.export.load import inspect_source, load_source
from sdexport.export.onnx import dummy_inputs, export_component, trace_env
from sdexport.export.wrappers import wrap
from sdexport.specs.presets import TINY_RANGES


@pytest.fixture(scope="module")
def raw_unet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """The tiny SDXL UNet traced twice: weights inline, and weights in loose external files (as large graphs are)."""
    info = inspect_source("tiny-sdxl")
    source = load_source(info)
    component = info.spec.components["unet"]
    root = tmp_path_factory.mktemp("raw")
    export_component(wrap(source.pipe, info.spec, component), component,
                     trace_env(info.spec, component, TINY_RANGES), root / "inline" / "model.onnx")
    loose = root / "loose"
    loose.mkdir()
    model = onnx.load(str(root / "inline" / "model.onnx"))
    onnx.save_model(model, str(loose / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    for folder in (root / "inline", loose):
        optimize.infer_types(folder / "model.onnx", folder / "typed.onnx")
    return root / "inline", loose, component


def _initializers(model: onnx.ModelProto, base: Path) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i, str(base)) for i in model.graph.initializer}


def test_streamed_fp16_equals_in_memory_conversion(raw_unet: tuple[Path, Path, object], tmp_path: Path) -> None:
    inline, loose, component = raw_unet
    reference = optimize.convert_fp16(optimize.drop_initializer_inputs(optimize.load_graph(inline / "typed.onnx")))
    streamed_graph = optimize.drop_initializer_inputs(optimize.load_graph(loose / "typed.onnx", with_data=False))
    assert optimize._external_tensors(streamed_graph)
    streamed = optimize.convert_fp16_streaming(streamed_graph, loose)
    written = optimize.save_graph(streamed, tmp_path / "model.onnx", source_dir=loose)
    assert [p.name for p in written] == ["model.onnx", "model.onnx.data"]
    saved = onnx.load(str(tmp_path / "model.onnx"))
    ref_init, got_init = _initializers(reference, tmp_path), _initializers(saved, tmp_path)
    assert ref_init.keys() == got_init.keys()
    for name, value in ref_init.items():
        assert got_init[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got_init[name], value, err_msg=name)
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in reference.graph.node]
    feeds = dummy_inputs(component, {"batch": 2, "latent_height": 9, "latent_width": 7, "sequence": 77}, 3)
    a = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    b = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(a[0], b[0])


def test_streamed_consolidation_keeps_every_weight(raw_unet: tuple[Path, Path, object], tmp_path: Path) -> None:
    inline, loose, _ = raw_unet
    graph = optimize.drop_initializer_inputs(optimize.load_graph(loose / "model.onnx", with_data=False))
    optimize.save_graph(graph, tmp_path / "model.onnx", source_dir=loose)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    expected = _initializers(onnx.load(str(inline / "model.onnx")), inline)
    got = _initializers(onnx.load(str(tmp_path / "model.onnx")), tmp_path)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_inline_weights_move_to_one_aligned_data_file(tmp_path: Path) -> None:
    """A small graph held in memory is saved like a large one: weights in model.onnx.data, scalars inline."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 32), dtype=np.float32)  # 2 KiB: external
    b = rng.standard_normal((1, 32), dtype=np.float32)  # 128 bytes: stays inline
    v = rng.standard_normal((32, 32), dtype=np.float32)  # 4 KiB: external, at the next page
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
         helper.make_node("MatMul", ["hb", "v"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(v, "v")])
    written = optimize.save_graph(helper.make_model(graph), tmp_path / "model.onnx")
    assert [p.name for p in written] == ["model.onnx", "model.onnx.data"]
    saved = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data} for t in saved.graph.initializer}
    assert where["b"] == {} and where["w"]["offset"] == "0" and int(where["v"]["offset"]) % 4096 == 0
    x = rng.standard_normal((2, 16), dtype=np.float32)
    got = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got[0], (x @ w + b) @ v, rtol=1e-5, atol=1e-5)  # fp32 matmul order differences


def test_graph_without_large_weights_stands_alone(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    assert optimize.save_graph(helper.make_model(graph), tmp_path / "model.onnx") == [tmp_path / "model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
