"""`sdexport doctor`: the machine report and the per-folder verdict, from given environments and real folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdexport.engines.artifacts import sha256_file, write_manifest
from sdexport.engines.doctor import DoctorReport, diagnose, format_report, run_doctor
from sdexport.engines.tensorrt.compat import Environment, GpuInfo

ADA = GpuInfo(0, "NVIDIA GeForce RTX 4090", "8.9", 24564, "GPU-1")
HERE = Environment(gpus=(ADA,), driver_version="560.35.03", cuda_version="12.6", tensorrt_version="10.16.1.11")
NO_GPU = Environment(gpu_error="nvidia-smi not found; CUDA driver probe: cuInit failed",
                     tensorrt_error="cannot import tensorrt (No module named 'tensorrt'); install the gpu extra")
ENGINE = {"plan": "unet/engine.plan", "size": 1, "sha256": "0", "tensorrt_version": "10.16.1.11",
          "gpu": {"name": ADA.name, "compute_capability": "8.9"}, "hardware_compatibility": "NONE"}


def _folder(tmp_path: Path, engines: dict | None) -> Path:
    folder = tmp_path / "compiled"
    folder.mkdir()
    config = folder / "scheduler" / "scheduler_config.json"
    config.parent.mkdir()
    config.write_text("{}")
    manifest = {
        "files": {"scheduler/scheduler_config.json": {"size": 2, "sha256": sha256_file(config)}}, "components": {},
        "backend": "tensorrt" if engines else "onnxruntime", "sdexport_version": "0", "tokenizers": [],
        "source": {"kind": "tiny", "id": "tiny-sd15", "hash": "0"},
        "model": {"family": "sd", "inpaint": False, "components": {}, "vae_scale_factor": 8, "scaling_factor": 0.18,
                  "clip_skip_max": 1, "time_ids_dim": None},
        "shape_ranges": {"batch": [1, 1, 1], "height": [64, 64, 64], "width": [64, 64, 64], "prompt_chunks": 1},
    }
    if engines:
        manifest["engines"] = engines
    write_manifest(folder, manifest)
    return folder


def test_engines_that_fit_this_machine(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"unet": ENGINE})
    code, text = run_doctor(folder, env=HERE)
    assert code == 0
    assert "GPU 0:        NVIDIA GeForce RTX 4090, sm_89, 24564 MiB" in text
    assert "driver:       560.35.03 (CUDA 12.6)" in text and "TensorRT:     10.16.1.11" in text
    assert "unet            OK" in text


def test_engines_for_another_machine_fail_with_the_rebuild_command(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"unet": dict(ENGINE, gpu={"name": "NVIDIA H100", "compute_capability": "9.0"})})
    code, text = run_doctor(folder, env=HERE)
    assert code == 1
    assert "cannot run here: built for NVIDIA H100 (sm_90), this is NVIDIA GeForce RTX 4090 (sm_89)" in text
    assert f"sdexport build --model <source> --out {folder} --backend tensorrt" in text
    code, text = run_doctor(folder, as_json=True, env=NO_GPU)
    data = json.loads(text)
    assert code == 1 and data["ok"] is False and len(data["folder"]["engines"]["unet"]) == 2


def test_machine_without_gpu_and_folders_without_engines_or_manifest(tmp_path: Path) -> None:
    report = diagnose(_folder(tmp_path, None), env=NO_GPU)
    text = format_report(report)
    assert report.ok and "GPU:          none (nvidia-smi not found" in text
    assert "TensorRT:     not available: cannot import tensorrt" in text
    assert "no TensorRT engines: it runs with ONNX Runtime" in text
    assert "CPUExecutionProvider" in text
    broken = diagnose(tmp_path / "nothing", env=NO_GPU)
    assert not broken.ok and "does not exist" in format_report(broken)


def test_report_flags_both_onnxruntime_builds_and_gpu_providers_without_gpu() -> None:
    report = DoctorReport("3.11", "linux", {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}, NO_GPU,
                          ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], None)
    text = format_report(report)
    assert "both installed and overwrite each other's files" in text
    assert "without a GPU sessions fall back to CPU" in text
    json.dumps(report.to_dict())


@pytest.mark.parametrize("device", [0, 1])
def test_device_index_is_honoured(tmp_path: Path, device: int) -> None:
    code, text = run_doctor(_folder(tmp_path, {"unet": ENGINE}), device=device, env=HERE)
    assert code == device and ("no NVIDIA GPU at CUDA device 1" in text) == bool(device)
