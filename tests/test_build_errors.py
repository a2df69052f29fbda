"""Bad input to `sdexport build` / `sdexport info`: one clear message each, and nothing already built is damaged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from sdexport.cli import main
from sdexport.engines import artifacts
from sdexport.engines.artifacts import build_lock, load_manifest
from sdexport.errors import ArtifactError, BuildLockedError, SourceError
from sdexport.export.build import BuildConfig, build
from sdexport.export.load import inspect_source, load_source


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("err") / "sd"
    build(BuildConfig(model="tiny-sd15", out=folder))
    return folder


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "tiny-sd15-diffusers"
    load_source(inspect_source("tiny-sd15")).pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _offline_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Point huggingface_hub at ``cache`` with the network off (its constants are read at import time)."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))


def test_unknown_preset_exits_2_and_lists_choices(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", "--model", "tiny-sd16", "--out", "/nonexistent/never"])
    err = capsys.readouterr().err
    assert code == 2
    assert "tiny-sd16" in err and "tiny-sdxl-refiner" in err and "sdxl-inpaint" in err


def test_hub_id_not_cached_nor_reachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _offline_cache(monkeypatch, tmp_path / "empty-cache")
    with pytest.raises(SourceError) as exc:
        inspect_source("acme/no-such-model")
    message = str(exc.value)
    assert "acme/no-such-model" in message and "--random-weights" in message and "local diffusers folder" in message


def test_hub_id_found_in_local_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, saved_folder: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-sd" / "snapshots" / "0123abcd"
    shutil.copytree(saved_folder, snapshot)
    (cache / "models--acme--tiny-sd" / "refs").mkdir()
    (cache / "models--acme--tiny-sd" / "refs" / "main").write_text("0123abcd")
    _offline_cache(monkeypatch, cache)
    info = inspect_source("acme/tiny-sd")
    assert info.kind == "hub" and info.spec.family == "sd"
    assert info.folder == snapshot


def test_missing_and_non_diffusers_folders(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        inspect_source(str(tmp_path / "nope"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(SourceError, match="no model_index.json"):
        inspect_source(str(tmp_path / "plain"))


def test_pickle_weights_refused_unless_opted_in(tmp_path: Path, saved_folder: Path) -> None:
    folder = _copy(saved_folder, tmp_path)
    unet = load_source(inspect_source(str(folder))).pipe.unet
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert list((folder / "unet").glob("*.bin"))
    with pytest.raises(SourceError) as exc:
        build(BuildConfig(model=str(folder), out=tmp_path / "out"))
    assert "pickle" in str(exc.value) and "--allow-pickle" in str(exc.value) and "save_pretrained" in str(exc.value)
    result = build(BuildConfig(model=str(folder), out=tmp_path / "out", allow_pickle=True))
    assert "unet" in result.built


def test_unwritable_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ArtifactError, match="cannot write to output folder"):
        build(BuildConfig(model="tiny-sd15", out=blocker / "out"))


def test_concurrent_build_is_refused(tmp_path: Path) -> None:
    with build_lock(tmp_path / "locked"), pytest.raises(BuildLockedError, match="another sdexport build"):
        build(BuildConfig(model="tiny-sd15", out=tmp_path / "locked"))


def test_build_lock_is_released_and_held_across_processes(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    with build_lock(folder):
        pass
    code = ("import sys; from pathlib import Path; from sdexport.engines.artifacts import build_lock\n"
            "try:\n    with build_lock(Path(sys.argv[1])): print('acquired')\n"
            "except Exception as exc: print(type(exc).__name__)")
    with build_lock(folder):  # released above: taking it again works
        held = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                              timeout=120, check=True)
    free = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120,
                          check=True)
    assert (held.stdout.strip(), free.stdout.strip()) == ("BuildLockedError", "acquired")


def test_truncated_graph_is_detected_and_rebuild_repairs_only_it(tmp_path: Path, built: Path) -> None:
    folder = _copy(built, tmp_path)
    graph = folder / "unet" / "model.onnx"
    before = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(graph)).graph.initializer}
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"unet/model.onnx.*truncated"):
        load_manifest(folder)
    assert main(["info", str(folder)]) == 1
    result = build(BuildConfig(model="tiny-sd15", out=folder))
    assert result.built == ["unet"]
    load_manifest(folder)
    # only the UNet was loaded for the repair, with the same seeded weights as the full build
    after = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(graph)).graph.initializer}
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert (after[name] == value).all(), name


def test_edited_graph_same_size_is_detected(tmp_path: Path, built: Path) -> None:
    folder = _copy(built, tmp_path)
    graph = folder / "vae_decoder" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_manifest(folder)


def test_edited_or_missing_manifest(tmp_path: Path, built: Path) -> None:
    folder = _copy(built, tmp_path)
    manifest = folder / artifacts.MANIFEST
    manifest.write_text(manifest.read_text()[:-20])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_manifest(folder)
    manifest.unlink()
    with pytest.raises(ArtifactError, match="did not finish"):
        load_manifest(folder)


def test_manifest_path_outside_folder_is_refused(tmp_path: Path, built: Path) -> None:
    folder = _copy(built, tmp_path)
    data = json.loads((folder / artifacts.MANIFEST).read_text())
    data["files"]["../outside.bin"] = {"size": 1, "sha256": "0" * 64}
    artifacts.write_manifest(folder, data)
    with pytest.raises(ArtifactError, match="points outside the folder"):
        load_manifest(folder)


def test_external_data_pointing_outside_is_refused(tmp_path: Path, built: Path) -> None:
    folder = _copy(built, tmp_path)
    graph_path = folder / "vae_decoder" / "model.onnx"
    graph = onnx.load(str(graph_path))
    tensor = graph.graph.initializer[0]
    length = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../../evil.data"), ("offset", "0"), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    graph_path.write_bytes(graph.SerializeToString())
    data = json.loads((folder / artifacts.MANIFEST).read_text())
    data["files"]["vae_decoder/model.onnx"] = artifacts.file_record(folder, graph_path)
    artifacts.write_manifest(folder, data)
    with pytest.raises(ArtifactError, match="outside the folder"):
        load_manifest(folder)


def test_lora_that_does_not_fit_leaves_the_folder_intact(tmp_path: Path, built: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from sdexport.export.lora import LoraSpec

    folder = _copy(built, tmp_path)
    bad = tmp_path / "alien.safetensors"
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.no_such_block.to_q.lora_B.weight": torch.zeros(32, 4)}, str(bad))
    with pytest.raises(SourceError, match="alien.safetensors"):
        build(BuildConfig(model="tiny-sd15", out=folder, loras=[LoraSpec(bad, 0.5)]))
    load_manifest(folder)  # the previous build still verifies


def test_pickle_lora_refused(tmp_path: Path) -> None:
    from sdexport.export.lora import LoraSpec

    lora = tmp_path / "style.bin"
    lora.write_bytes(b"\x80\x04")
    with pytest.raises(SourceError, match="--allow-pickle"):
        build(BuildConfig(model="tiny-sd15", out=tmp_path / "o", loras=[LoraSpec.parse(f"{lora}:0.5")]))
    spec = LoraSpec.parse("/x/y:z.safetensors")
    assert spec.path == Path("/x/y:z.safetensors") and spec.weight == 1.0
    assert LoraSpec.parse("a.safetensors:0.25").weight == 0.25


def test_tensorrt_backend_without_gpu_fails_before_any_export(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from sdexport.engines.tensorrt import compat

    monkeypatch.setattr(compat, "probe_environment", lambda: compat.Environment(gpu_error="no GPU in this test"))
    monkeypatch.setattr("sdexport.engines.tensorrt.build.probe_environment", compat.probe_environment)
    code = main(["build", "--model", "tiny-sd15", "--out", str(tmp_path / "trt"), "--backend", "tensorrt"])
    assert code == 1
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
    assert not (tmp_path / "trt").exists()


def test_an_ip_adapter_and_controlnets_in_one_build_are_refused_before_any_work(tmp_path: Path) -> None:
    from sdexport.export.controlnet import ControlNetSpec

    config = BuildConfig(model="tiny-sd15", out=tmp_path / "out", ip_adapter=tmp_path / "adapter.safetensors",
                         controlnets=[ControlNetSpec.parse(str(tmp_path / "controlnet"))])
    with pytest.raises(ValueError, match=r"ip_adapter=.*adapter\.safetensors.* with controlnets: .*not both"):
        build(config)
    assert not (tmp_path / "out").exists()
