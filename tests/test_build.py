"""`sdexport build` on the tiny presets: every graph validates, the folder is complete, rebuilds are incremental."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sdexport.engines.artifacts import load_manifest
from sdexport.export.build import BuildConfig, build
from sdexport.export.load import inspect_source, load_source
from sdexport.export.onnx import dummy_inputs, torch_outputs
from sdexport.export.wrappers import wrap
from sdexport.progress import Step

EXPECTED = {
    # preset: (family, components, unet in_channels, time_ids)
    "tiny-sd15": ("sd", ["text_encoder", "vae_encoder", "vae_decoder", "unet"], 4, 0),
    "tiny-sd15-inpaint": ("sd", ["text_encoder", "vae_encoder", "vae_decoder", "unet"], 9, 0),
    "tiny-sdxl": ("sdxl", ["text_encoder", "text_encoder_2", "vae_encoder", "vae_decoder", "unet"], 4, 6),
    "tiny-sdxl-refiner": ("sdxl-refiner", ["text_encoder_2", "vae_encoder", "vae_decoder", "unet"], 4, 5),
    "tiny-sdxl-inpaint": ("sdxl", ["text_encoder", "text_encoder_2", "vae_encoder", "vae_decoder", "unet"], 9, 6),
}


MESSAGES: dict[str, list[str]] = {}
"""The progress messages of each fixture build."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("builds")
    out = {}
    for preset in EXPECTED:
        out[preset] = root / preset
        build(BuildConfig(model=preset, out=out[preset]), progress=MESSAGES.setdefault(preset, []).append)
    return out


def test_progress_messages_carry_their_phase_position(folders: dict[str, Path]) -> None:
    messages = MESSAGES["tiny-sdxl"]
    positions = [(m.phase, m.done, m.total) for m in messages if isinstance(m, Step)]
    assert positions == [("export", i, 5) for i in range(5)] + [("validate", i, 5) for i in range(1, 6)]
    assert messages[0] == "text_encoder: exporting (fp32)" and "built" in messages[-1]


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_tiny_preset_builds_complete_verified_folder(folders: dict[str, Path], preset: str) -> None:
    family, components, in_channels, time_ids = EXPECTED[preset]
    manifest = load_manifest(folders[preset])
    assert manifest["model"]["family"] == family
    assert sorted(manifest["components"]) == sorted(components)
    unet = manifest["model"]["components"]["unet"]
    assert unet["inputs"][0]["dims"][1] == in_channels
    assert manifest["model"]["time_ids_dim"] == time_ids
    for name, comp in manifest["components"].items():
        assert comp["validation"]["passed"], name
        assert len(comp["validation"]["shapes"]) == 2
        assert (folders[preset] / comp["graph"]).is_file()
    tokenizers = ["tokenizer_2"] if family == "sdxl-refiner" else (
        ["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"])
    assert manifest["tokenizers"] == tokenizers
    for tok in tokenizers:
        assert f"{tok}/vocab.json" in manifest["files"]
    assert json.loads((folders[preset] / "scheduler/scheduler_config.json").read_text())["_class_name"]
    for tool in ("torch", "diffusers", "onnx", "onnxruntime"):
        assert manifest["tools"][tool] != "not installed"


def test_graph_is_correct_at_sizes_it_was_not_traced_at(folders: dict[str, Path]) -> None:
    """Odd latent sides (and not multiples of 8) must work, not only the traced size."""
    info = inspect_source("tiny-sdxl")
    source = load_source(info)
    component = info.spec.components["unet"]
    wrapper = wrap(source.pipe, info.spec, component)
    session = ort.InferenceSession(str(folders["tiny-sdxl"] / "unet/model.onnx"), providers=["CPUExecutionProvider"])
    for h, w in [(11, 13), (32, 17), (4, 31)]:
        feeds = dummy_inputs(component, {"batch": 2, "latent_height": h, "latent_width": w, "sequence": 77}, 7)
        (ref,) = torch_outputs(wrapper, component, feeds)
        (got,) = session.run(None, feeds)
        # fp32 ONNX Runtime vs torch: same tolerance as the build's validation of the UNet.
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)


def test_rebuild_is_a_noop(folders: dict[str, Path]) -> None:
    folder = folders["tiny-sd15"]
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    result = build(BuildConfig(model="tiny-sd15", out=folder))
    assert result.up_to_date
    assert result.built == []
    after = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    assert after == before


def test_precision_change_rebuilds_only_what_changed(tmp_path: Path) -> None:
    folder = tmp_path / "xl"
    build(BuildConfig(model="tiny-sdxl", out=folder))
    result = build(BuildConfig(model="tiny-sdxl", out=folder, precision="fp16"))
    # The SDXL VAE stays fp32 under --precision fp16, so it is reused.
    assert sorted(result.built) == ["text_encoder", "text_encoder_2", "unet"]
    assert sorted(result.reused) == ["vae_decoder", "vae_encoder"]
    manifest = load_manifest(folder)
    assert manifest["components"]["unet"]["precision"] == "fp16"
    assert manifest["components"]["vae_decoder"]["precision"] == "fp32"


def test_fp16_graphs_have_fp16_weights_fp32_io_and_validate(tmp_path: Path) -> None:
    folder = tmp_path / "sd16"
    build(BuildConfig(model="tiny-sd15", out=folder, precision="fp16",
                      component_precision={"vae_encoder": "fp32"}))
    manifest = load_manifest(folder)
    assert manifest["components"]["vae_encoder"]["precision"] == "fp32"
    for name in ("unet", "text_encoder", "vae_decoder"):
        comp = manifest["components"][name]
        assert comp["precision"] == "fp16"
        assert comp["validation"]["tolerance"] == {"atol": 3e-2, "rtol": 3e-2} or name == "text_encoder"
        graph = onnx.load(str(folder / comp["graph"]))
        dtypes = {i.data_type for i in graph.graph.initializer if len(i.dims) >= 2}
        assert onnx.TensorProto.FLOAT16 in dtypes
        io = [*graph.graph.input, *graph.graph.output]
        assert all(t.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64) for t in io)


def test_local_folder_builds_the_same_as_the_preset(tmp_path: Path, folders: dict[str, Path]) -> None:
    source = load_source(inspect_source("tiny-sdxl"))
    saved = tmp_path / "my-model"
    source.pipe.save_pretrained(saved, safe_serialization=True)
    out = tmp_path / "from-folder"
    build(BuildConfig(model=str(saved), out=out))
    mine, preset = load_manifest(out), load_manifest(folders["tiny-sdxl"])
    assert mine["source"]["kind"] == "folder"
    assert mine["model"]["components"] == preset["model"]["components"]
    assert mine["model"]["family"] == "sdxl"
    for name in preset["components"]:
        a = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(out / name / "model.onnx")).graph.initializer}
        b = {i.name: onnx.numpy_helper.to_array(i)
             for i in onnx.load(str(folders["tiny-sdxl"] / name / "model.onnx")).graph.initializer}
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
    for fname in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (out / "tokenizer_2" / fname).read_bytes() == (folders["tiny-sdxl"] / "tokenizer_2" / fname).read_bytes()


def test_weight_map_names_every_graph_weight(folders: dict[str, Path]) -> None:
    folder = folders["tiny-sdxl"]
    manifest = load_manifest(folder)
    source = load_source(inspect_source("tiny-sdxl"))
    for name in ("unet", "text_encoder", "text_encoder_2"):
        wmap = json.loads((folder / manifest["components"][name]["weight_map"]).read_text())
        graph = onnx.load(str(folder / manifest["components"][name]["graph"]))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
        module = getattr(source.pipe, name)
        params = dict(module.named_parameters())
        float_inits = {k for k, v in inits.items() if v.dtype == np.float32 and v.size > 1}
        assert float_inits <= set(wmap["params"].values()), f"{name}: weights without a parameter name"
        for param, init in wmap["params"].items():
            np.testing.assert_array_equal(inits[init], params[param].detach().numpy())


def test_random_weights_resolve_full_size_architectures() -> None:
    """--random-weights builds from the embedded full-size configs (weights are not loaded here)."""
    sdxl = inspect_source("sdxl", random_weights=True)
    assert sdxl.kind == "random"
    assert sdxl.spec.family == "sdxl"
    unet_inputs = {t.name: t.dims for t in sdxl.spec.components["unet"].inputs}
    assert unet_inputs["encoder_hidden_states"][2] == 2048
    assert unet_inputs["text_embeds"][1] == 1280
    assert unet_inputs["time_ids"][1] == 6
    refiner = inspect_source("sdxl-refiner", random_weights=True)
    assert refiner.spec.family == "sdxl-refiner"
    assert refiner.spec.time_ids_dim == 5
    sd = inspect_source("sd15-inpaint", random_weights=True)
    assert sd.spec.inpaint and sd.spec.family == "sd"
    assert torch.get_num_threads() >= 1
