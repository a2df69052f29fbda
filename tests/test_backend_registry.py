"""A backend registered from this file alone shows up everywhere: CLI choices and flags, doctor, build, load, run.

The dummy backend wraps ONNX Runtime (so its images must equal the onnxruntime backend's exactly), counts its runs,
and has a compile hook that writes one file, recorded in the manifest like TensorRT's engines.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdexport.cli import main, parser
from sdexport.engines import (
    Backend,
    BackendStatus,
    Option,
    backend_names,
    get_backend,
    register_backend,
    unregister_backend,
)
from sdexport.engines.artifacts import atomic_write_json, file_record
from sdexport.engines.doctor import run_doctor
from sdexport.engines.ort import open_component

RUNS: list[str] = []


class CountingEngine:
    """An ONNX Runtime engine that records every run."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.inputs, self.outputs = inner, inner.name, inner.inputs, inner.outputs

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        RUNS.append(self.name)
        return self.inner.run(feeds)


def _open(component: Any, options: Mapping[str, Any]) -> CountingEngine:
    return CountingEngine(open_component(component, {"threads": options.get("threads")}))


def _compile(folder: Path, manifest: Mapping[str, Any], options: Mapping[str, Any],
             progress: Callable[[str], None]) -> dict[str, Any]:
    progress(f"dummy: compiling {len(manifest['components'])} components")
    target = folder / "dummy" / "compiled.json"
    atomic_write_json(target, {"note": options["note"], "components": sorted(manifest["components"])})
    return {"dummy": {"note": options["note"]}, "files": {"dummy/compiled.json": file_record(folder, target)}}


@pytest.fixture
def dummy() -> Iterator[Backend]:
    backend = register_backend(Backend(
        name="dummy", title="Dummy", help="ONNX Runtime behind a counter (a test backend)", open=_open,
        load_options=(Option("threads", "intra-op threads", type=int),),
        build_options=(Option("note", "written by the compile hook", default="hello"),),
        compile=_compile, probe=lambda device: BackendStatus(True, f"always here (device {device})", "0.0"),
        extra="dummy-extra", packages=("numpy",),
    ))
    RUNS.clear()
    yield backend
    unregister_backend("dummy")


def _choices(ap: argparse.ArgumentParser, command: str) -> list[str]:
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return list(next(a for a in sub._actions if "--backend" in a.option_strings).choices)


def test_dummy_backend_is_offered_by_the_cli_and_doctor(dummy: Backend) -> None:
    assert "dummy" in backend_names() and get_backend("dummy") is dummy
    ap = parser()
    assert "dummy" in _choices(ap, "build") and "dummy" in _choices(ap, "run")
    assert ap.parse_args(["build", "--backend", "dummy", "--note", "x"]).__dict__["backend:dummy:note"] == "x"
    code, text = run_doctor()
    assert code == 0 and "  dummy           runs here: always here (device 0)" in text
    assert json.loads(run_doctor(as_json=True)[1])["backends"]["dummy"]["version"] == "0.0"


def test_unregistered_backend_is_gone(dummy: Backend) -> None:
    unregister_backend("dummy")
    assert "dummy" not in _choices(parser(), "build")
    with pytest.raises(ValueError, match=r"backend 'dummy' is not available; choose one of .*'onnxruntime'"):
        get_backend("dummy")


def test_dummy_backend_builds_loads_and_runs_a_tiny_folder(dummy: Backend, tiny_folder: Callable[[str], Path],
                                                           tiny_pipe: Callable[[str], Any], tmp_path: Path) -> None:
    from sdexport.runtime.pipeline import Pipeline

    folder = tmp_path / "tiny-sd15"
    shutil.copytree(tiny_folder("tiny-sd15"), folder)
    assert main(["build", "--model", "tiny-sd15", "--out", str(folder), "--backend", "dummy", "--note", "hi"]) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["backend"] == "dummy" and manifest["dummy"] == {"note": "hi"}
    assert "dummy/compiled.json" in manifest["files"]
    pipe = Pipeline.load(folder, backend="dummy", engine_options={"threads": 1})
    kwargs = dict(prompt="a red circle", num_inference_steps=2, seed=3, output_type="np_float")
    ours = pipe(**kwargs).images
    assert {"text_encoder", "unet", "vae_decoder"} <= set(RUNS) and RUNS.count("unet") >= 2  # one per step at least
    np.testing.assert_array_equal(ours, tiny_pipe("tiny-sd15")(**kwargs).images)  # same graphs, same runtime
    with pytest.raises(ValueError, match=r"backend 'dummy' has no option\(s\) \['device'\]; allowed: \['threads'\]"):
        Pipeline.load(folder, backend="dummy", engine_options={"device": 0})


def test_tensorrt_flags_come_from_its_declared_options() -> None:
    from sdexport.cli import _backend_values
    from sdexport.engines.tensorrt.build import TrtOptions
    from sdexport.engines.tensorrt.profiles import Bucket

    trt = get_backend("tensorrt")
    args = parser().parse_args(["build", "--backend", "tensorrt", "--bucket", "64x48", "--bucket", "32x32",
                                "--shapes", "both", "--refittable", "--trt-components", "unet", "vae_decoder",
                                "--device", "1", "--build-timeout", "5", "--timing-cache", "/tmp/t.cache"])
    assert trt.build_config(_backend_values(args, trt)) == TrtOptions(
        shapes="both", buckets=(Bucket(64, 48), Bucket(32, 32)), refittable=True, components=("unet", "vae_decoder"),
        device=1, timeout_s=5.0, timing_cache=Path("/tmp/t.cache"))
    assert trt.build_config(None) == TrtOptions()  # the defaults of the flags are TrtOptions' own
    assert trt.build_config(_backend_values(parser().parse_args(["build"]), trt)) == TrtOptions()
    with pytest.raises(SystemExit):
        parser().parse_args(["build", "--hardware-compatibility", "any"])
    with pytest.raises(ValueError, match=r"backend 'tensorrt' has no build option\(s\) \['fp8'\]; allowed: "):
        trt.build_config({"fp8": True})


def test_option_kinds_are_checked() -> None:
    with pytest.raises(ValueError, match=r"option 'x': kind 'list' is not one of"):
        Option("x", "help", kind="list")
    with pytest.raises(TypeError, match="takes a Backend record"):
        register_backend("dummy")  # type: ignore[arg-type]
