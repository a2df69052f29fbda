"""Mutated compiled folders: every path the runtime opens is inside, listed and hashed; info and load agree."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from sdexport.cli import main
from sdexport.engines.artifacts import describe, load_manifest, sha256_file
from sdexport.engines.onnx_refs import external_data_locations
from sdexport.errors import ArtifactError
from sdexport.runtime.pipeline import Pipeline

PRESET = "tiny-sd15"


@pytest.fixture
def folder(tiny_folder: Callable[[str], Path], tmp_path: Path) -> Path:
    """A private copy of the tiny SD 1.5 folder (its build records and lock left out)."""
    target = tmp_path / "folder"
    shutil.copytree(tiny_folder(PRESET), target, ignore=shutil.ignore_patterns(".build", ".lock"))
    return target


def manifest_of(folder: Path) -> dict[str, Any]:
    """The folder's manifest as stored."""
    return json.loads((folder / "manifest.json").read_text())


def write(folder: Path, manifest: dict[str, Any], rehash: tuple[str, ...] = ()) -> None:
    """Store ``manifest``, first recording the current size and sha256 of the ``rehash`` files (as an attacker can)."""
    for relative in rehash:
        path = folder / relative
        manifest["files"][relative] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def assert_refused(folder: Path, pattern: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Pipeline.load, load_manifest (what `info` runs) and the `sdexport info` CLI all refuse, naming ``pattern``."""
    with pytest.raises(ArtifactError, match=pattern):
        Pipeline.load(folder)
    with pytest.raises(ArtifactError, match=pattern):
        describe(folder, load_manifest(folder))
    capsys.readouterr()
    assert main(["info", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "verified" not in captured.out
    assert re.search(pattern, captured.err), captured.err
    assert "Traceback" not in captured.err


def outside_config(folder: Path, tmp_path: Path) -> Path:
    """A valid scheduler config outside the folder, with a different beta_end (it would change the image)."""
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    path = tmp_path / "outside_scheduler.json"
    path.write_text(json.dumps({**config, "beta_end": 0.02}))
    return path


def test_the_untouched_copy_loads_and_info_says_verified(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pipe = Pipeline.load(folder)
    assert pipe.scheduler_base_config["beta_end"] == 0.012
    assert main(["info", str(folder)]) == 0
    assert "verified" in capsys.readouterr().out


def test_absolute_scheduler_config_outside_is_refused(folder: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    manifest = manifest_of(folder)
    manifest["scheduler_config"] = str(outside_config(folder, tmp_path))
    write(folder, manifest)
    assert_refused(folder, r"outside_scheduler\.json.* points outside the folder", capsys)


def test_dotdot_scheduler_config_is_refused(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outside_config(folder, tmp_path)
    manifest = manifest_of(folder)
    manifest["scheduler_config"] = "../outside_scheduler.json"
    write(folder, manifest)
    assert_refused(folder, r"'\.\./outside_scheduler\.json' in .* points outside the folder", capsys)


def test_unlisted_scheduler_config_inside_is_refused(folder: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(outside_config(folder, tmp_path), folder / "scheduler" / "other.json")
    manifest = manifest_of(folder)
    manifest["scheduler_config"] = "scheduler/other.json"
    write(folder, manifest)
    assert_refused(folder, r"scheduler_config 'scheduler/other\.json' .* not a file the manifest lists", capsys)


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_tokenizer_outside_is_refused(folder: Path, tmp_path: Path, kind: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(folder / "tokenizer", tmp_path / "outside_tokenizer")
    manifest = manifest_of(folder)
    manifest["tokenizers"] = [str(tmp_path / "outside_tokenizer") if kind == "absolute" else "../outside_tokenizer"]
    write(folder, manifest)
    assert_refused(folder, r"outside_tokenizer' in .* points outside the folder", capsys)


def test_unlisted_tokenizer_folder_inside_is_refused(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(folder / "tokenizer", folder / "tokenizer_other")
    manifest = manifest_of(folder)
    manifest["tokenizers"] = ["tokenizer_other"]
    write(folder, manifest)
    assert_refused(folder, r"tokenizers\[0\] file 'tokenizer_other/vocab\.json' .* not a file the manifest lists",
                   capsys)


def _point_at_external_data(graph: Path, location: str) -> None:
    """Make the graph's first initializer refer to external data at ``location`` (written without onnx.save)."""
    model = onnx.load(str(graph))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd"])
def test_external_data_outside_is_refused_before_onnx_runtime(folder: Path, location: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    for graph in ("vae_encoder/model.onnx", "vae_encoder/model.ort.onnx"):
        _point_at_external_data(folder / graph, location)
    write(folder, manifest_of(folder), rehash=("vae_encoder/model.onnx", "vae_encoder/model.ort.onnx"))
    assert_refused(folder, re.escape(repr(f"vae_encoder/{location}" if location[0] != "/" else location))
                   + r" in .* points outside the folder", capsys)


def test_external_data_inside_but_unlisted_is_refused(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "scheduler" / "weights.bin").write_bytes(bytes(64))
    for graph in ("vae_encoder/model.onnx", "vae_encoder/model.ort.onnx"):
        _point_at_external_data(folder / graph, "../scheduler/weights.bin")
    write(folder, manifest_of(folder), rehash=("vae_encoder/model.onnx", "vae_encoder/model.ort.onnx"))
    assert_refused(folder, r"external data of vae_encoder/model(\.ort)?\.onnx: .* not a file the manifest lists",
                   capsys)


def test_external_data_locations_match_onnx(tmp_path: Path) -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [256])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [256])],
        [onnx.numpy_helper.from_array(np.ones(256, "float32"), "w")],
    )
    path = tmp_path / "model.onnx"
    onnx.save_model(onnx.helper.make_model(graph), str(path), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    assert (tmp_path / "model.onnx.data").stat().st_size == 1024
    assert external_data_locations(path) == ["model.onnx.data"]


def test_fused_sibling_graph_must_be_listed(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = manifest_of(folder)
    del manifest["files"]["unet/model.ort.onnx"]
    write(folder, manifest)
    assert_refused(folder, r"unet/model\.ort\.onnx is not listed in the manifest", capsys)


def test_fused_sibling_graph_must_match_its_hash(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(folder / "vae_decoder" / "model.ort.onnx", folder / "unet" / "model.ort.onnx")
    manifest = manifest_of(folder)
    manifest["files"]["unet/model.ort.onnx"]["size"] = (folder / "unet" / "model.ort.onnx").stat().st_size
    write(folder, manifest)
    assert_refused(folder, r"unet/model\.ort\.onnx does not match its sha256", capsys)


def test_manifest_symlink_leaving_the_folder_is_refused(folder: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "outside_manifest.json"
    shutil.move(folder / "manifest.json", outside)
    (folder / "manifest.json").symlink_to(outside)
    assert_refused(folder, r"'manifest\.json' in .* points outside the folder", capsys)


def test_graph_symlink_leaving_the_folder_is_refused(folder: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "outside_model.onnx"
    shutil.move(folder / "unet" / "model.onnx", outside)
    (folder / "unet" / "model.onnx").symlink_to(outside)  # same bytes: the hash alone would accept it
    assert_refused(folder, r"'unet/model\.onnx' in .* points outside the folder", capsys)


def test_symlink_loop_names_the_file(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "manifest.json").unlink()
    os.symlink("manifest.json", folder / "manifest.json")
    assert_refused(folder, r"cannot resolve 'manifest\.json' in ", capsys)


def test_invalid_utf8_manifest_names_the_file(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = folder / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"backend"', b'"back\xffend"', 1))
    assert_refused(folder, r"manifest\.json is not valid UTF-8", capsys)


def test_garbage_graph_with_updated_hash_names_the_file(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "vae_decoder" / "model.ort.onnx").write_bytes(b"\x0a\xff\xff\xff\x0fnot a graph")
    write(folder, manifest_of(folder), rehash=("vae_decoder/model.ort.onnx",))
    assert_refused(folder, r"vae_decoder/model\.ort\.onnx is not a readable ONNX graph", capsys)


def test_graph_onnx_runtime_cannot_load_names_the_file(folder: Path) -> None:
    graph = folder / "vae_decoder" / "model.ort.onnx"
    model = onnx.load(str(graph))
    model.graph.node[0].op_type = "NoSuchOperator"
    graph.write_bytes(model.SerializeToString())
    write(folder, manifest_of(folder), rehash=("vae_decoder/model.ort.onnx",))
    with pytest.raises(ArtifactError, match=r"cannot load .*vae_decoder/model\.ort\.onnx: .*NoSuchOperator"):
        Pipeline.load(folder)


def test_unlisted_file_in_a_component_folder_is_refused_by_info_too(folder: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "text_encoder" / "notes.txt").write_text("unverified")
    assert_refused(folder, r"text_encoder/notes\.txt is not listed in the manifest", capsys)


def _node(manifest: dict[str, Any], keys: tuple[Any, ...]) -> Any:
    node: Any = manifest
    for key in keys:
        node = node[key]
    return node


def _delete(*keys: Any) -> Callable[[dict[str, Any]], None]:
    return lambda manifest: _node(manifest, keys[:-1]).__delitem__(keys[-1])


def _set(*keys_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *keys, value = keys_and_value
    return lambda manifest: _node(manifest, tuple(keys[:-1])).__setitem__(keys[-1], value)


SCHEMA_CASES = [
    (_delete("components", "vae_encoder", "graph"), "components.vae_encoder.graph", "is missing"),
    (_set("components", None), "components", "must be an object"),
    (_set("tokenizers", 0, True), "tokenizers[0]", "must be string"),
    (_delete("backend"), "backend", "is missing"),
    (_delete("files"), "files", "is missing"),
    (_set("loras", True), "loras", "must be a list"),
    (_set("source", "hash", {}), "source.hash", "must be string"),
    (_set("files", "unet/model.onnx", "size", "12"), "files.unet/model.onnx.size", "must be integer"),
    (_set("shape_ranges", "height", [32, None, 256]), "shape_ranges.height[1]", "must be integer"),
    (_delete("components", "vae_decoder"), "components.vae_decoder", "is missing"),
    (_set("scheduler_config", 3), "scheduler_config", "must be string"),
    (_set("components", "unet", "profile", []), "components.unet.profile", "must be an object"),
]


@pytest.mark.parametrize(("mutate", "key", "problem"), SCHEMA_CASES, ids=[case[1] for case in SCHEMA_CASES])
def test_manifest_schema_names_the_wrong_key(folder: Path, mutate: Callable[[dict[str, Any]], None], key: str,
                                             problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = manifest_of(folder)
    mutate(manifest)
    write(folder, manifest)
    assert_refused(folder, re.escape(f"key {key!r} {problem}"), capsys)
