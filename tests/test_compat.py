"""Live environment vs engine manifest: GPU discovery without TensorRT objects, version / compute-capability
rules, plan verification by hash, and the messages that say what to rebuild."""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import pytest

from sdexport.engines.artifacts import sha256_file
from sdexport.engines.tensorrt import compat
from sdexport.engines.tensorrt.compat import Environment, GpuInfo, engine_problems, engine_warnings
from sdexport.errors import ArtifactError, CompatibilityError

SMI_CSV = """0, NVIDIA GeForce RTX 4090, 8.9, 24564, 560.35.03, GPU-aaaa-1111
1, NVIDIA A100-SXM4-80GB, 8.0, [N/A], 560.35.03, GPU-bbbb-2222
"""
ADA = GpuInfo(0, "NVIDIA GeForce RTX 4090", "8.9", 24564, "GPU-aaaa-1111")
ADA_L4 = GpuInfo(0, "NVIDIA L4", "8.9", 23034, "GPU-cccc")
HOPPER = GpuInfo(0, "NVIDIA H100 80GB HBM3", "9.0", 81559, "GPU-dddd")
TURING = GpuInfo(0, "Tesla T4", "7.5", 15360, "GPU-eeee")
RECORD = {"tensorrt_version": "10.16.1.11", "gpu": {"name": ADA.name, "compute_capability": "8.9"},
          "hardware_compatibility": "NONE", "version_compatible": False}


def env(gpu: GpuInfo | None = ADA, trt: str | None = "10.16.1.11") -> Environment:
    return Environment(gpus=(gpu,) if gpu else (), gpu_error=None if gpu else "nvidia-smi not found",
                       tensorrt_version=trt, tensorrt_error=None if trt else "cannot import tensorrt")


def test_nvidia_smi_csv_and_cuda_visible_devices() -> None:
    gpus = compat.parse_nvidia_smi(SMI_CSV)
    assert gpus[0] == ADA and gpus[1].memory_mib == 0 and gpus[1].sm == "sm_80"
    assert compat.visible_gpus(gpus, None) == tuple(gpus)
    assert compat.visible_gpus(gpus, "1") == (gpus[1],)
    assert compat.visible_gpus(gpus, "GPU-bbbb") == (gpus[1],)
    assert compat.visible_gpus(gpus, "1,0") == (gpus[1], gpus[0])
    assert compat.visible_gpus(gpus, "0,7,1") == (gpus[0],)  # CUDA stops at the first invalid entry
    assert compat.visible_gpus(gpus, "") == ()


@pytest.mark.parametrize(("record", "environment", "problem"), [
    (RECORD, env(), None),
    (RECORD, env(HOPPER), r"built for NVIDIA GeForce RTX 4090 \(sm_89\), this is NVIDIA H100 80GB HBM3 \(sm_90\)"),
    (RECORD, env(ADA_L4), None),  # same compute capability: allowed, with a warning (below)
    (dict(RECORD, hardware_compatibility="SAME_COMPUTE_CAPABILITY"), env(HOPPER), "sm_89.*sm_90"),
    (dict(RECORD, hardware_compatibility="AMPERE_PLUS"), env(HOPPER), None),
    (dict(RECORD, hardware_compatibility="AMPERE_PLUS"), env(TURING), "Ampere or newer GPU.*Tesla T4"),
    (RECORD, env(trt="10.16.1.12"), "built with TensorRT 10.16.1.11, this is TensorRT 10.16.1.12"),
    (dict(RECORD, version_compatible=True), env(trt="11.4.0.106"), None),
    (dict(RECORD, version_compatible=True), env(trt="10.8.0.43"), "version-compatible from TensorRT 10.16.1.11"),
    (RECORD, env(gpu=None), "no NVIDIA GPU at CUDA device 0 \\(nvidia-smi not found\\)"),
    (RECORD, env(trt=None), "cannot import tensorrt"),
])
def test_engine_compatibility_rules(record: dict, environment: Environment, problem: str | None) -> None:
    problems = engine_problems(record, environment)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and re.search(problem, problems[0]), problems


def test_other_gpu_model_of_the_same_compute_capability_only_warns() -> None:
    assert engine_warnings(RECORD, env(ADA_L4))[0].startswith("built on NVIDIA GeForce RTX 4090, running on NVIDIA L4")
    assert engine_warnings(RECORD, env(ADA)) == []
    assert engine_warnings(dict(RECORD, hardware_compatibility="SAME_COMPUTE_CAPABILITY"), env(ADA_L4)) == []


def test_check_engines_lists_every_problem_and_the_rebuild_command(tmp_path: Path) -> None:
    compat.check_engines(tmp_path, {"unet": RECORD}, env())
    with pytest.raises(CompatibilityError) as info:
        compat.check_engines(tmp_path, {"unet": RECORD, "text_encoder": RECORD}, env(HOPPER, "10.16.1.12"))
    message = str(info.value)
    assert message.count("unet:") == 2 and message.count("text_encoder:") == 2
    assert f"sdexport build --model <source> --out {tmp_path} --backend tensorrt" in message


def test_plan_is_verified_by_size_and_hash_before_use(tmp_path: Path) -> None:
    plan = tmp_path / "unet" / "engine.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"plan bytes")
    record = {"plan": "unet/engine.plan", "size": 10, "sha256": sha256_file(plan)}
    assert compat.verified_plan(tmp_path, record) == plan.resolve()
    plan.write_bytes(b"plan bytez")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        compat.verified_plan(tmp_path, record)
    plan.write_bytes(b"plan")
    with pytest.raises(ArtifactError, match="truncated"):
        compat.verified_plan(tmp_path, record)
    plan.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        compat.verified_plan(tmp_path, record)
    with pytest.raises(ArtifactError, match="outside the folder"):
        compat.verified_plan(tmp_path, dict(record, plan="../elsewhere.plan"))


def _fake_smi(folder: Path) -> None:
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n"
                      "case \"$1\" in --query-gpu=*) printf '%s' \"$SMI_CSV\";; "
                      "*) echo '| NVIDIA-SMI 560.35.03   Driver Version: 560.35.03   CUDA Version: 12.6 |';; esac\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_probe_reads_nvidia_smi_and_respects_cuda_visible_devices(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_smi(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SMI_CSV", SMI_CSV)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    compat.probe_environment.cache_clear()
    try:
        found = compat.probe_environment()
    finally:
        compat.probe_environment.cache_clear()
    assert [g.name for g in found.gpus] == ["NVIDIA A100-SXM4-80GB"]
    assert found.driver_version == "560.35.03" and found.cuda_version == "12.6"


def test_probes_never_import_tensorrt_in_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: the CUDA driver probe runs (in a child)
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    compat.probe_environment.cache_clear()
    try:
        found = compat.probe_environment()
    finally:
        compat.probe_environment.cache_clear()
    assert "tensorrt" not in sys.modules
    if found.gpus:  # a machine with a driver: found through libcuda, and said so
        assert "GPUs found through the CUDA driver" in found.notes[0]
    else:
        assert "nvidia-smi not found" in found.gpu_error and "CUDA driver probe" in found.gpu_error
    version, error = compat.probe_tensorrt()
    assert (version is None) == (error is not None)
    if error is not None:
        assert "pip install 'sdexport[gpu]'" in error
