"""Fused attention: constant-scale export, the MultiHeadAttention graph ONNX Runtime opens, and their parity."""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch.nn import functional

from sdexport.engines.artifacts import FUSED_GRAPH
from sdexport.engines.ort import OrtEngine, session_options
from sdexport.export.attention import constant_scale_attention
from sdexport.export.fused_attention import find_attention, fuse_attention
from sdexport.export.onnx import dummy_inputs, torch_outputs, validation_envs
from sdexport.export.validate import compare
from sdexport.export.wrappers import wrap
from sdexport.specs.presets import TINY_RANGES

PRESET = "tiny-sd15"


def _attention_modules(module: torch.nn.Module) -> int:
    from diffusers.models.attention_processor import Attention

    return sum(isinstance(m, Attention) for m in module.modules())


def _optimized_ops(graph: Path, tmp_path: Path) -> collections.Counter[str]:
    """Op counts of the graph ONNX Runtime actually runs (after its own optimisations) for ``graph``."""
    opts = session_options()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(graph), sess_options=opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)  # only the ops are read
    return collections.Counter(n.op_type for n in optimized.graph.node)


def test_folder_lists_fused_graphs_and_the_engine_opens_them(tiny_folder: Callable[[str], Path]) -> None:
    folder = tiny_folder(PRESET)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("unet", "vae_encoder", "vae_decoder"):
        assert f"{name}/{FUSED_GRAPH}" in manifest["files"], name
        assert manifest["components"][name]["validation"]["fused"]["passed"], name
    assert not (folder / "text_encoder" / FUSED_GRAPH).exists()  # CLIP's masked attention is left as exported
    spec = manifest["components"]["unet"]
    assert spec["graph"] == "unet/model.onnx"  # the portable graph stays the component's graph
    unet = folder / "unet" / "model.onnx"
    assert OrtEngine("unet", unet, (), ()).graph.name == FUSED_GRAPH
    assert OrtEngine("unet", unet, (), (), fused=False).graph == unet
    # ONNX Runtime's TensorRT provider cannot take MultiHeadAttention nodes: it is given the portable graph.
    trt = ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert OrtEngine("unet", unet, (), (), providers=trt).graph == unet


def test_onnx_runtime_runs_multihead_attention_for_every_attention_block(
        tiny_folder: Callable[[str], Path], tiny_source: Callable[[str], Any], tmp_path: Path) -> None:
    folder = tiny_folder(PRESET)
    blocks = _attention_modules(tiny_source(PRESET).pipe.unet)
    assert blocks > 0
    portable = folder / "unet" / "model.onnx"
    # The portable graph: standard ops only, every attention scale a constant (no Sqrt(Cast(Shape)) left).
    graph = onnx.load(str(portable))
    assert len(find_attention(graph.graph)) == blocks
    ops = collections.Counter(n.op_type for n in graph.graph.node)
    assert ops["Sqrt"] == 0 and ops["MultiHeadAttention"] == 0
    fused = _optimized_ops(folder / "unet" / FUSED_GRAPH, tmp_path)
    assert fused["MultiHeadAttention"] == blocks
    assert fused["Softmax"] == 0
    unfused = _optimized_ops(portable, tmp_path)
    assert unfused["MultiHeadAttention"] == 0 and unfused["Softmax"] == blocks


@pytest.mark.parametrize("name", ["unet", "vae_decoder", "vae_encoder"])
def test_fused_and_portable_graphs_match_diffusers(name: str, tiny_folder: Callable[[str], Path],
                                                   tiny_source: Callable[[str], Any]) -> None:
    folder = tiny_folder(PRESET)
    source = tiny_source(PRESET)
    component = source.spec.components[name]
    tol = component.tolerance("fp32")
    wrapper = wrap(source.pipe, source.spec, component)
    graph = folder / name / "model.onnx"
    engines = {fused: OrtEngine(name, graph, component.inputs, component.outputs, fused=fused)
               for fused in (True, False)}
    for seed, env in enumerate(validation_envs(source.spec, component, TINY_RANGES), start=11):
        feeds = dummy_inputs(component, env, seed)
        ref = torch_outputs(wrapper, component, feeds)[0]  # diffusers' own attention (SDPA)
        out = {fused: engine.run(feeds)[component.outputs[0].name] for fused, engine in engines.items()}
        for fused, got in out.items():
            # the component's tolerance (specs): fp32 UNet atol 1e-4 rtol 1e-3
            assert compare(name, got, ref, tol)["worst_ratio"] <= 1.0, (name, fused, env)
        assert compare(name, out[True], out[False], tol)["worst_ratio"] <= 1.0, (name, env)


def test_weight_overrides_apply_to_the_fused_graph(tiny_folder: Callable[[str], Path],
                                                   tiny_source: Callable[[str], Any]) -> None:
    """LoRA swaps replace initializers by name: the fused graph has the same names, so they land the same way."""
    folder = tiny_folder(PRESET)
    component = tiny_source(PRESET).spec.components["unet"]
    wmap = json.loads((folder / "unet" / "weight_map.json").read_text())["params"]
    target = next(v for k, v in wmap.items() if k.endswith("attn1.to_q.weight"))
    base = onnx.numpy_helper.to_array(
        next(i for i in onnx.load(str(folder / "unet" / "model.onnx")).graph.initializer if i.name == target))
    overrides = {target: base * 3.0}
    feeds = dummy_inputs(component, validation_envs(tiny_source(PRESET).spec, component, TINY_RANGES)[0], 5)
    out = {}
    for fused in (True, False):
        engine = OrtEngine("unet", folder / "unet" / "model.onnx", component.inputs, component.outputs,
                           initializer_overrides=overrides, fused=fused)
        out[fused] = engine.run(feeds)["out_sample"]
    plain = OrtEngine("unet", folder / "unet" / "model.onnx", component.inputs, component.outputs).run(feeds)
    assert np.abs(out[True] - plain["out_sample"]).max() > 1e-3  # the override changed the result
    np.testing.assert_allclose(out[True], out[False], atol=1e-5, rtol=1e-4)  # fused == portable, same weights


def _attention_graph(heads: int, head_dim: int, mask: bool) -> onnx.ModelProto:
    """A hand-written attention block in the exported pattern (optionally with an additive mask before Softmax)."""
    width = heads * head_dim
    nodes = [helper.make_node("Reshape", [x, "split"], [x + "r"]) for x in "qkv"]
    nodes += [helper.make_node("Transpose", ["qr"], ["qt"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["vr"], ["vt"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["qt", "kt"], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"])]
    if mask:
        nodes.append(helper.make_node("Add", ["scaled", "scale"], ["masked"]))
    nodes += [helper.make_node("Softmax", ["masked" if mask else "scaled"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "vt"], ["attended"]),
              helper.make_node("Transpose", ["attended"], ["merged"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["merged", "merge"], ["out"])]
    inits = [helper.make_tensor("split", TensorProto.INT64, [4], [0, -1, heads, head_dim]),
             helper.make_tensor("merge", TensorProto.INT64, [3], [0, -1, width]),
             helper.make_tensor("scale", TensorProto.FLOAT, [], [head_dim ** -0.5])]
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", f"S{x}", width]) for x in "qkv"]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "Sq", width])]
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_pass_fuses_the_pattern_with_its_heads_and_scale() -> None:
    model = _attention_graph(heads=3, head_dim=8, mask=False)
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((2, 10, 24), np.float32),
             "k": rng.standard_normal((2, 7, 24), np.float32), "v": rng.standard_normal((2, 7, 24), np.float32)}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert fuse_attention(model) == 1
    (node,) = model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, node.domain, attrs["num_heads"]) == ("MultiHeadAttention", "com.microsoft", 3)
    assert attrs["scale"] == pytest.approx(8 ** -0.5)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-5)


def test_pass_leaves_masked_attention_alone() -> None:
    model = _attention_graph(heads=2, head_dim=4, mask=True)
    before = [n.op_type for n in model.graph.node]
    assert fuse_attention(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_constant_scale_attention_equals_sdpa_and_is_undone() -> None:
    original = functional.scaled_dot_product_attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=gen) for _ in range(3))
    mask = torch.randn(2, 3, 9, 9, generator=gen)
    with constant_scale_attention():
        assert functional.scaled_dot_product_attention is not original
        explicit = functional.scaled_dot_product_attention(q, k, v)
        scaled = functional.scaled_dot_product_attention(q, k, v, scale=0.3)
        masked = functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert functional.scaled_dot_product_attention is original
    torch.testing.assert_close(explicit, original(q, k, v), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scaled, original(q, k, v, scale=0.3), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(masked, original(q, k, v, attn_mask=mask), atol=0, rtol=0)


@pytest.mark.parametrize("arena", [True, False])
def test_engine_shrinks_the_arena_after_each_run_only_when_it_has_one(
        arena: bool, tiny_folder: Callable[[str], Path], tiny_source: Callable[[str], Any]) -> None:
    folder = tiny_folder(PRESET)
    component = tiny_source(PRESET).spec.components["vae_decoder"]
    opts = session_options()
    assert opts.enable_cpu_mem_arena  # the default
    # Threads spin within a run and stop when it ends, so an idle session's pool does not hold the cores.
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    opts.enable_cpu_mem_arena = arena
    engine = OrtEngine("vae_decoder", folder / "vae_decoder" / "model.onnx", component.inputs, component.outputs,
                       options=opts)
    entry = engine.run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") if arena else None
    assert entry == ("cpu:0" if arena else None)
    feeds = dummy_inputs(component, validation_envs(tiny_source(PRESET).spec, component, TINY_RANGES)[0], 3)
    first, second = engine.run(feeds)["image"], engine.run(feeds)["image"]
    np.testing.assert_array_equal(first, second)  # shrinking between runs changes nothing in the results
