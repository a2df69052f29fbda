"""TensorRT build on CPU: builder decisions, how they are applied (against a fake held to the real API), the
child-process isolation (real crashes and timeouts), and build_engines' manifest records, reuse and refusals."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fakes.tensorrt import NEWEST, OLDEST, FakeTrt, copied_folder, fake_build_target, install
from sdexport.engines.artifacts import load_manifest, read_manifest
from sdexport.engines.tensorrt import layer as trt_layer
from sdexport.engines.tensorrt.build import (
    BuildJob,
    EngineBuildError,
    TrtOptions,
    build_engines,
    decide,
    run_isolated,
    timing_cache_path,
)
from sdexport.engines.tensorrt.compat import Environment, GpuInfo
from sdexport.engines.tensorrt.profiles import Bucket
from sdexport.errors import CompatibilityError, SdexportError

ADA = GpuInfo(0, "NVIDIA GeForce RTX 4090", "8.9", 24564, "GPU-1234")
TURING = GpuInfo(0, "Tesla T4", "7.5", 15360, "GPU-5678")
ENV = Environment(gpus=(ADA,), driver_version="560.35", cuda_version="12.6", tensorrt_version=NEWEST)


@pytest.fixture(scope="module")
def folder(tiny_folder: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copied_folder(tiny_folder("tiny-sdxl"), tmp_path_factory)


def test_default_decisions_are_strongly_typed_with_no_precision_flags() -> None:
    d = decide(TrtOptions(), ADA)
    assert d.network_flags == ("STRONGLY_TYPED",)
    assert d.builder_flags == () and d.hardware_compatibility == "NONE"
    assert d.optimization_level == 3 and d.workspace_bytes is None
    assert not (d.refittable or d.stripped or d.host_code_allowed)


@pytest.mark.parametrize(("options", "flags", "host_code"), [
    (TrtOptions(refittable=True), ("REFIT",), False),
    (TrtOptions(strip_weights=True), ("STRIP_PLAN",), False),  # REFIT_IDENTICAL implied: weights fixed
    (TrtOptions(refittable=True, strip_weights=True), ("REFIT", "STRIP_PLAN"), False),
    (TrtOptions(version_compatible=True), ("VERSION_COMPATIBLE",), True),
    (TrtOptions(version_compatible=True, exclude_lean_runtime=True), ("VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"),
     False),
])
def test_flag_decisions(options: TrtOptions, flags: tuple[str, ...], host_code: bool) -> None:
    d = decide(options, ADA)
    assert d.builder_flags == flags and d.host_code_allowed is host_code


@pytest.mark.parametrize(("options", "gpu", "message"), [
    (TrtOptions(optimization_level=6), ADA, "choose 0..5"),
    (TrtOptions(hardware_compatibility="any"), ADA, "none, same-cc, ampere"),
    (TrtOptions(hardware_compatibility="ampere+"), TURING, "Ampere or newer GPU to build on; this is Tesla T4"),
    (TrtOptions(exclude_lean_runtime=True), ADA, "only applies to --version-compatible"),
    (TrtOptions(version_compatible=True, refittable=True), ADA, "lean runtime, which cannot refit"),
    (TrtOptions(workspace_gib=0), ADA, "must be > 0"),
])
def test_refused_option_combinations_say_why(options: TrtOptions, gpu: GpuInfo, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decide(options, gpu)


def test_timing_cache_is_kept_per_gpu_and_tensorrt_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = timing_cache_path(TrtOptions(), ADA, "10.16.1.11")
    assert path == tmp_path / "sdexport/tensorrt/10.16.1.11-sm_89-NVIDIA_GeForce_RTX_4090.timing-cache"
    assert timing_cache_path(TrtOptions(), TURING, "10.16.1.11") != path
    assert timing_cache_path(TrtOptions(timing_cache=tmp_path / "x.cache"), ADA, "1") == tmp_path / "x.cache"


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_apply_config_sets_every_decision(version: str) -> None:
    trt = FakeTrt(version)
    builder = trt.Builder(None)
    config = builder.create_builder_config()
    d = decide(TrtOptions(refittable=True, workspace_gib=2, optimization_level=5, hardware_compatibility="ampere+"),
               ADA)
    profiles = [{"label": "a", "shapes": {"x": {"min": [1, 4], "opt": [2, 4], "max": [4, 4]}}},
                {"label": "b", "shapes": {"x": {"min": [1, 4], "opt": [1, 4], "max": [1, 4]}}}]
    trt_layer.apply_config(trt, builder, config, d.to_dict(), profiles)
    assert config._flags == [trt.BuilderFlag.REFIT]
    assert config._pools == {trt.MemoryPoolType.WORKSPACE: 2 * 2**30}
    assert config.builder_optimization_level == 5
    assert config.hardware_compatibility_level == trt.HardwareCompatibilityLevel.AMPERE_PLUS
    assert config._profiles == [p["shapes"] for p in profiles]


def test_same_compute_capability_needs_a_tensorrt_that_has_it() -> None:
    d = decide(TrtOptions(hardware_compatibility="same-cc"), ADA).to_dict()
    old = FakeTrt(OLDEST)
    with pytest.raises(CompatibilityError, match="no hardware compatibility level SAME_COMPUTE_CAPABILITY"):
        trt_layer.apply_config(old, old.Builder(None), old.Builder(None).create_builder_config(), d, [])
    new = FakeTrt(NEWEST)
    config = new.Builder(None).create_builder_config()
    trt_layer.apply_config(new, new.Builder(None), config, d, [])
    assert config.hardware_compatibility_level == new.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY


def _job(folder: Path, name: str, tmp_path: Path, cache: Path | None) -> BuildJob:
    manifest = load_manifest(folder)
    from sdexport.engines.tensorrt.profiles import component_profiles
    from sdexport.specs import ModelSpec, ShapeRanges

    spec = ModelSpec.from_dict(manifest["model"])
    profiles = component_profiles(spec.components[name], ShapeRanges.from_dict(manifest["shape_ranges"]), 8)
    return BuildJob(name, str(folder / manifest["components"][name]["graph"]), str(tmp_path / f"{name}.plan"),
                    [p.to_dict() for p in profiles], decide(TrtOptions(), ADA).to_dict(), str(cache) if cache else None)


def test_build_plan_writes_the_plan_and_merges_the_timing_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               folder: Path) -> None:
    trt = install(monkeypatch)  # after the folder exists: the exporter's torch probes for tensorrt
    cache = tmp_path / "cache" / "t.timing-cache"
    info = trt_layer.build_plan(_job(folder, "unet", tmp_path, cache))
    plan = json.loads((tmp_path / "unet.plan").read_text())
    assert plan["network_flags"] == 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert plan["flags"] == [] and len(plan["profiles"]) == 5  # the tiny default buckets
    assert [t["name"] for t in info["io"]] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                               "time_ids", "out_sample"]
    assert info["io"][0] == {"name": "sample", "mode": "input", "dtype": "float32", "shape": [-1, 4, -1, -1]}
    assert json.loads(cache.read_text()) == ["unet"]
    trt_layer.build_plan(_job(folder, "vae_decoder", tmp_path, cache))
    assert json.loads(cache.read_text()) == ["unet", "vae_decoder"]  # merged, not overwritten
    trt.fail_build = True
    with pytest.raises(SdexportError, match="could not build unet"):
        trt_layer.build_plan(_job(folder, "unet", tmp_path, None))


def _returns(arg: Any) -> dict[str, Any]:
    return {"pid": os.getpid(), "arg": arg}


def _raises(arg: Any) -> dict[str, Any]:
    raise RuntimeError(f"builder says no to {arg}")


def _segfaults(arg: Any) -> dict[str, Any]:
    os.kill(os.getpid(), signal.SIGSEGV)
    return {}


def _must_not_build(job: BuildJob) -> dict[str, Any]:
    raise AssertionError("rebuilt an up-to-date engine")


def _hangs(arg: Any) -> dict[str, Any]:
    time.sleep(60)
    return {}


def test_child_process_isolates_crashes_errors_and_timeouts() -> None:
    result = run_isolated(_returns, 3, "ok")
    assert result["arg"] == 3 and result["pid"] != os.getpid()
    with pytest.raises(EngineBuildError, match="unet engine: RuntimeError: builder says no to 4"):
        run_isolated(_raises, 4, "unet engine")
    with pytest.raises(EngineBuildError, match="killed by SIGSEGV"):
        run_isolated(_segfaults, 0, "unet engine")
    with pytest.raises(EngineBuildError, match="did not finish in time"):
        run_isolated(_hangs, 0, "unet engine", timeout_s=2)


def test_build_engines_records_reuses_and_rebuilds(folder: Path, tmp_path: Path) -> None:
    manifest = load_manifest(folder)
    options = TrtOptions(refittable=True, components=("unet", "text_encoder"), timing_cache=tmp_path / "c",
                         buckets=(Bucket(64, 64), Bucket(96, 64)))
    messages: list[str] = []
    out = build_engines(folder, manifest, options, messages.append, ENV, fake_build_target)
    unet = out["engines"]["unet"]
    assert [p["label"] for p in unet["profiles"]] == ["64x64", "96x64"]
    assert [p["label"] for p in out["engines"]["text_encoder"]["profiles"]] == ["dynamic"]
    assert unet["plan"] == "unet/engine.plan" and out["files"]["unet/engine.plan"]["sha256"] == unet["sha256"]
    assert unet["gpu"] == {"name": ADA.name, "compute_capability": "8.9"} and unet["tensorrt_version"] == NEWEST
    assert unet["refittable"] and unet["builder_flags"] == ["REFIT"] and unet["timing_cache"]["sha256"]
    assert (folder / "unet/engine.plan").stat().st_size == unet["size"]

    again = build_engines(folder, dict(manifest, engines=out["engines"]), options, messages.append, ENV,
                          _must_not_build)
    assert again["engines"] == out["engines"]
    assert "unet: TensorRT engine up to date" in messages
    (folder / "unet/engine.plan").write_bytes(b"tampered")
    with pytest.raises(EngineBuildError, match="rebuilt an up-to-date engine"):
        build_engines(folder, dict(manifest, engines=out["engines"]), options, None, ENV, _must_not_build)
    changed = replace(options, optimization_level=5)  # another key: rebuilt, not reused
    rebuilt = build_engines(folder, dict(manifest, engines=out["engines"]), changed, None, ENV, fake_build_target)
    assert rebuilt["engines"]["unet"]["key"] != unet["key"] and rebuilt["engines"]["unet"]["optimization_level"] == 5


def test_build_engines_refuses_without_gpu_or_tensorrt(folder: Path) -> None:
    # The manifest as stored: the tests above leave engine plans (unlisted until a build merges them) beside graphs.
    manifest = read_manifest(folder)
    with pytest.raises(CompatibilityError, match="needs an NVIDIA GPU.*sdexport doctor"):
        build_engines(folder, manifest, TrtOptions(), None, Environment(gpu_error="nvidia-smi not found"))
    no_trt = Environment(gpus=(ADA,), tensorrt_error="cannot import tensorrt; install the gpu extra")
    with pytest.raises(CompatibilityError, match="gpu extra"):
        build_engines(folder, manifest, TrtOptions(), None, no_trt)
    with pytest.raises(ValueError, match="no component"):
        build_engines(folder, manifest, TrtOptions(components=("safety_checker",)), None, ENV, fake_build_target)
