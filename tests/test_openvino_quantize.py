"""Hybrid int8 on OpenVINO: `sdexport quantize` calibrates on the folder's calls, writes a listed IR, hybrid runs it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdexport import Pipeline
from sdexport.cli import main
from sdexport.demo.shapes import caption, trained_combos
from sdexport.engines import artifacts
from sdexport.engines import openvino as ov_backend
from sdexport.engines import openvino_quantize as oq
from sdexport.errors import ArtifactError

PROMPT = "a red circle on a blue background"
CALIBRATION = oq.QuantizeConfig(prompts=tuple(caption(*c) for c in trained_combos()[:4]), pictures=4, steps=6,
                                guidance=2.0, samples=12)


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


@pytest.fixture(scope="module")
def quantized(tiny_folder: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo folder (trained weights) with its UNet quantised."""
    folder = _copy(tiny_folder("demo"), tmp_path_factory.mktemp("quantized") / "demo")
    oq.quantize_folder(folder, CALIBRATION)
    return folder


def _picture(folder: Path, precision: str) -> tuple[np.ndarray, Any]:
    pipe = Pipeline.load(folder, backend="openvino", engine_options={"precision": precision})
    result = pipe(PROMPT, seed=3, num_inference_steps=8, guidance_scale=2.0, output_type="np")
    return np.asarray(result.images[0], dtype=np.float64), pipe


def test_the_ir_is_listed_hashed_and_tied_to_its_source_graph(quantized: Path) -> None:
    manifest = artifacts.load_manifest(quantized, verify=True)  # sizes and sha256 of every listed file, the IR's too
    entry = manifest["components"]["unet"][oq.KEY]
    assert entry["method"] == "int8-hybrid" and entry["samples"] == 12
    # one CFG-batched UNet call per timestep and picture; the demo's PNDM (skip_prk_steps) has steps + 1 timesteps
    assert entry["calls_recorded"] == 4 * (6 + 1)
    assert entry["source_sha256"] == manifest["files"]["unet/model.onnx"]["sha256"]
    for suffix in (".xml", ".bin"):
        relative = f"unet/{oq.SUBDIR}/model{suffix}"
        assert manifest["files"][relative] == artifacts.file_record(quantized, quantized / relative)
    assert all(oq.KEY not in manifest["components"][c] for c in ("text_encoder", "vae_decoder", "vae_encoder"))


def test_the_ir_holds_int8_convolutions_and_float_activations_elsewhere(quantized: Path) -> None:
    import openvino as ov

    model = ov.Core().read_model(str(quantized / "unet" / oq.SUBDIR / "model.xml"))
    ops = model.get_ops()
    fake_quantize = [op for op in ops if op.get_type_name() == "FakeQuantize"]
    int8_constants = [op for op in ops if op.get_type_name() == "Constant"
                      and op.get_output_element_type(0).get_type_name() in ("i8", "u8")]
    consumers = {target.get_node().get_type_name() for fq in fake_quantize
                 for target in fq.output(0).get_target_inputs()}
    assert fake_quantize and int8_constants
    assert "Convolution" in consumers  # activations quantised where they feed a convolution
    assert "MatMul" not in consumers or all(  # linear layers keep f32 activations (int8 weights only)
        fq.input_value(0).get_node().get_type_name() == "Constant" for fq in fake_quantize
        if "MatMul" in {t.get_node().get_type_name() for t in fq.output(0).get_target_inputs()})


def test_hybrid_runs_the_ir_close_to_f32_and_keeps_the_demo_score(quantized: Path) -> None:
    from sdexport.demo.evaluate import read

    ref, _ = _picture(quantized, "f32")
    got, pipe = _picture(quantized, "hybrid")
    assert pipe.engines["unet"].precision == "hybrid"
    assert pipe.engines["unet"].graph == quantized / "unet" / oq.SUBDIR / "model.xml"
    assert {pipe.engines[c].precision for c in ("text_encoder", "vae_decoder")} == {"f32"}
    diff = np.abs(got - ref)
    # int8 convolutions + int8 weights, demo model 64x64, 8 steps: measured mean 2.5/255 (max 44); allowed: a mean
    # within 6/255, and not the same image (the IR really ran), and the shape and colours still read back as asked
    assert 0 < diff.mean() <= 6.0, diff.mean()
    assert read(got.astype(np.uint8)).combo == ("red", "circle", "blue")


def test_hybrid_bf16_uses_the_bf16_hint_for_the_rest(quantized: Path) -> None:
    component = Pipeline.load(quantized, backend="openvino").components["text_encoder"]
    assert ov_backend.compile_config("hybrid-bf16")["INFERENCE_PRECISION_HINT"] == "bf16"
    assert ov_backend.compile_config("hybrid")["INFERENCE_PRECISION_HINT"] == "f32"
    assert ov_backend._graph_at(component, {}, "hybrid-bf16") == component.graph  # no IR: its ONNX


def test_hybrid_without_a_quantised_unet_names_the_command(tiny_folder: Callable[[str], Path]) -> None:
    with pytest.raises(ArtifactError, match=r"unet has no quantised graph; run `sdexport quantize .* --component"):
        Pipeline.load(tiny_folder("demo"), backend="openvino", engine_options={"precision": "hybrid"})


def test_lora_swaps_are_refused_on_the_quantised_graph(quantized: Path) -> None:
    component = Pipeline.load(quantized, backend="openvino").components["unet"]
    with pytest.raises(ValueError, match="LoRAs cannot be swapped into a quantised graph; fuse them at build"):
        ov_backend.open_component(component, {"precision": "hybrid", "initializer_overrides": {"w": np.zeros(1)}})


def test_an_ir_made_from_another_graph_is_refused(quantized: Path, tmp_path: Path) -> None:
    folder = _copy(quantized, tmp_path / "stale")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["components"]["unet"][oq.KEY]["source_sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"was made from another unet/model.onnx; run `sdexport quantize"):
        artifacts.load_manifest(folder)


def test_a_failed_quantisation_leaves_the_manifest_as_it_was(tiny_folder: Callable[[str], Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _copy(tiny_folder("demo"), tmp_path / "demo")
    before = (folder / "manifest.json").read_bytes()

    def broken(model: Any, samples: Any) -> Any:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(oq, "hybrid_quantize", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        oq.quantize_folder(folder, oq.QuantizeConfig(pictures=1, steps=2, samples=2))
    assert (folder / "manifest.json").read_bytes() == before
    artifacts.load_manifest(folder)  # still a whole folder


def test_a_rebuild_keeps_the_ir_of_an_unchanged_graph_and_drops_a_stale_one(quantized: Path) -> None:
    old = artifacts.read_manifest(quantized)
    new = json.loads(json.dumps({**old, "components": {**old["components"]}}))
    for record in new["components"].values():
        record.pop(oq.KEY, None)
    new["files"] = {p: r for p, r in new["files"].items() if oq.SUBDIR not in p}
    oq.carry_over(old, new)
    assert new["components"]["unet"][oq.KEY] == old["components"]["unet"][oq.KEY]
    assert new["files"] == old["files"]

    rebuilt = json.loads(json.dumps(new))
    for record in rebuilt["components"].values():
        record.pop(oq.KEY, None)
    rebuilt["files"] = {p: r for p, r in rebuilt["files"].items() if oq.SUBDIR not in p}
    rebuilt["files"]["unet/model.onnx"] = {"size": 1, "sha256": "f" * 64}  # the UNet was rebuilt
    oq.carry_over(old, rebuilt)
    assert oq.KEY not in rebuilt["components"]["unet"] and not any(oq.SUBDIR in p for p in rebuilt["files"])


def test_remove_stale_deletes_only_unlisted_ir_folders(tmp_path: Path) -> None:
    (tmp_path / "unet" / oq.SUBDIR).mkdir(parents=True)
    (tmp_path / "vae_decoder" / oq.SUBDIR).mkdir(parents=True)
    oq.remove_stale(tmp_path, {"components": {"unet": {oq.KEY: {}}, "vae_decoder": {}}})
    assert (tmp_path / "unet" / oq.SUBDIR).is_dir() and not (tmp_path / "vae_decoder" / oq.SUBDIR).exists()


def test_spread_takes_evenly_spaced_calls() -> None:
    assert oq.spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert oq.spread([1, 2], 5) == [1, 2]


def test_recorder_keeps_copies_and_passes_outputs_through() -> None:
    class Echo:
        inputs = outputs = ()

        def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
            return {"out": feeds["x"] * 2}

    Echo.inputs = (type("T", (), {"name": "x"})(),)
    recorder = oq.Recorder(Echo())
    x = np.ones(3)
    assert np.array_equal(recorder.run({"x": x})["out"], 2 * x)
    x[:] = 5
    assert np.array_equal(recorder.calls[0]["x"], np.ones(3))  # a copy: the loop reuses its arrays


@pytest.mark.parametrize(("field", "value", "message"), [
    ("components", ("vae",), r"quantize components \['vae'\]: choose from"),
    ("samples", 0, r"quantize samples=0 must be >= 1"),
    ("prompts", ("",), "non-empty prompts"),
])
def test_bad_settings_are_named(field: str, value: Any, message: str) -> None:
    config = oq.QuantizeConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        config.check(["text_encoder", "unet", "vae_decoder"])


def test_the_command_quantises_and_reports_bad_flags(tiny_folder: Callable[[str], Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = _copy(tiny_folder("tiny-sd15"), tmp_path / "tiny")
    assert main(["quantize", str(folder), "--component", "vae"]) == 1
    assert "quantize components ['vae']: choose from" in capsys.readouterr().err
    assert main(["quantize", str(folder), "--height", "64"]) == 2
    assert "--height and --width together" in capsys.readouterr().err
    assert main(["-q", "quantize", str(folder), "--pictures", "1", "--steps", "3", "--samples", "3"]) == 0
    assert "unet quantised (int8-hybrid, 3 calls)" in capsys.readouterr().out
    pipe = Pipeline.load(folder, backend="openvino", engine_options={"precision": "hybrid"})
    assert pipe.engines["unet"].precision == "hybrid"


def test_doctor_names_hybrid_where_nncf_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "hybrid (after sdexport quantize)" in ov_backend.probe().detail
    monkeypatch.setattr(ov_backend.precision_probe, "nncf_available", lambda: False)
    assert "hybrid" not in ov_backend.probe().detail
