"""The live environment (GPUs, driver, TensorRT) and whether a built engine may load in it.

Nothing here constructs a TensorRT object: without a usable GPU, ``trt.Runtime()`` can crash the interpreter, so
GPUs are found with ``nvidia-smi`` (or a CUDA driver probe in a child process) and the TensorRT version is read
by importing ``tensorrt`` in a child process.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdexport.engines.artifacts import check_inside, sha256_file
from sdexport.engines.registry import BackendStatus
from sdexport.errors import ArtifactError, CompatibilityError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 20.0
_SMI_FIELDS = "index,name,compute_cap,memory.total,driver_version,uuid"

# A child process that asks the CUDA driver (libcuda) for its devices with ctypes; used when nvidia-smi is absent.
_CUDA_DRIVER_PROBE = r"""
import ctypes, json, sys
lib = ctypes.CDLL("libcuda.so.1")
if lib.cuInit(0) != 0:
    raise SystemExit("cuInit failed: no usable NVIDIA driver / device")
count, version = ctypes.c_int(), ctypes.c_int()
lib.cuDeviceGetCount(ctypes.byref(count)); lib.cuDriverGetVersion(ctypes.byref(version))
out = []
for i in range(count.value):
    dev, major, minor, mem = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_size_t()
    name = ctypes.create_string_buffer(256)
    lib.cuDeviceGet(ctypes.byref(dev), i); lib.cuDeviceGetName(name, 256, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev); lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
    lib.cuDeviceTotalMem_v2(ctypes.byref(mem), dev)
    out.append({"index": i, "name": name.value.decode(), "compute_capability": f"{major.value}.{minor.value}",
                "memory_mib": mem.value // 2**20})
sys.stdout.write(json.dumps({"gpus": out, "cuda": f"{version.value // 1000}.{version.value % 1000 // 10}"}))
"""
_TRT_PROBE = "import tensorrt, json, sys; sys.stdout.write(json.dumps({'version': tensorrt.__version__}))"


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as the driver reports it."""

    index: int
    name: str
    compute_capability: str
    memory_mib: int = 0
    uuid: str = ""

    @property
    def sm(self) -> str:
        """``sm_89`` style name of the compute capability."""
        return "sm_" + self.compute_capability.replace(".", "")


@dataclass(frozen=True)
class Environment:
    """What this machine offers a TensorRT engine."""

    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None
    gpu_error: str | None = None
    tensorrt_version: str | None = None
    tensorrt_error: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def gpu(self, device: int = 0) -> GpuInfo | None:
        """The GPU at CUDA ordinal ``device`` (after CUDA_VISIBLE_DEVICES), or None."""
        return self.gpus[device] if 0 <= device < len(self.gpus) else None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (for `sdexport doctor --json` and build records)."""
        return asdict(self)


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """GPUs from ``nvidia-smi --query-gpu=index,name,compute_cap,memory.total,driver_version,uuid`` CSV."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 6 or not parts[0].isdigit():
            continue
        memory = int(float(parts[3])) if re.fullmatch(r"[\d.]+", parts[3]) else 0
        gpus.append(GpuInfo(int(parts[0]), parts[1], parts[2], memory, parts[5]))
    return gpus


def visible_gpus(gpus: Sequence[GpuInfo], cuda_visible_devices: str | None) -> tuple[GpuInfo, ...]:
    """The GPUs a CUDA process sees, in CUDA ordinal order, given CUDA_VISIBLE_DEVICES (indices or UUIDs)."""
    if cuda_visible_devices is None:
        return tuple(gpus)
    out: list[GpuInfo] = []
    for token in (t.strip() for t in cuda_visible_devices.split(",")):
        match = next((g for g in gpus if token and (str(g.index) == token or g.uuid.startswith(token)
                                                   or g.uuid == f"GPU-{token}")), None)
        if match is None:
            break  # CUDA stops at the first invalid entry
        out.append(match)
    return tuple(out)


def _run(args: Sequence[str], timeout: float = PROBE_TIMEOUT_S) -> tuple[int, str, str]:
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, "", str(exc)
    return proc.returncode, proc.stdout, proc.stderr


def _probe_nvidia_smi() -> tuple[list[GpuInfo], str | None, str | None, str | None]:
    """(gpus, driver version, CUDA version the driver supports, error)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], None, None, "nvidia-smi not found"
    code, out, err = _run([smi, f"--query-gpu={_SMI_FIELDS}", "--format=csv,noheader,nounits"])
    if code != 0:
        return [], None, None, f"nvidia-smi failed: {(err or out).strip()[:300]}"
    gpus = parse_nvidia_smi(out)
    driver = out.strip().splitlines()[0].split(",")[4].strip() if gpus else None
    code, header, _ = _run([smi])
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header) if code == 0 else None
    return gpus, driver, cuda.group(1) if cuda else None, None if gpus else "nvidia-smi lists no GPU"


def _probe_cuda_driver() -> tuple[list[GpuInfo], str | None, str | None]:
    """(gpus, CUDA version, error) from libcuda in a child process."""
    import json

    code, out, err = _run([sys.executable, "-c", _CUDA_DRIVER_PROBE])
    if code != 0:
        return [], None, (err.strip().splitlines() or [f"exit code {code}"])[-1]
    data = json.loads(out)
    return [GpuInfo(**g) for g in data["gpus"]], data["cuda"], None


def probe_tensorrt() -> tuple[str | None, str | None]:
    """(TensorRT version, error), by importing ``tensorrt`` in a child process (no TensorRT object is built)."""
    import json

    code, out, err = _run([sys.executable, "-c", _TRT_PROBE])
    if code != 0:
        last = (err.strip().splitlines() or [f"exit code {code}"])[-1]
        return None, f"cannot import tensorrt ({last}); install the gpu extra: pip install 'sdexport[gpu]'"
    return json.loads(out)["version"], None


@functools.cache
def probe_environment() -> Environment:
    """GPUs, driver, CUDA and TensorRT of this machine (cached per process; every probe runs in a child)."""
    gpus, driver, cuda, error = _probe_nvidia_smi()
    notes: list[str] = []
    if not gpus:
        found, cuda_drv, drv_error = _probe_cuda_driver()
        if found:
            notes.append(f"{error}; GPUs found through the CUDA driver instead")
            gpus, cuda, error = found, cuda_drv, None
        else:
            error = f"{error}; CUDA driver probe: {drv_error}"
    visible = visible_gpus(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if gpus and not visible:
        error = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} hides every GPU"
    trt_version, trt_error = probe_tensorrt()
    return Environment(visible, driver, cuda, error, trt_version, trt_error, tuple(notes))


def backend_status(device: int = 0) -> BackendStatus:
    """The tensorrt backend's doctor probe: it runs here when TensorRT imports and a GPU is at ``device``."""
    env = probe_environment()
    gpu = env.gpu(device)
    problems = [] if gpu is not None else [f"no NVIDIA GPU at CUDA device {device}"]
    if env.tensorrt_version is None:
        problems.append("tensorrt is not importable")
    if gpu is None or env.tensorrt_version is None:
        return BackendStatus(False, "; ".join(problems), env.tensorrt_version)
    return BackendStatus(True, f"TensorRT {env.tensorrt_version} on {gpu.name} ({gpu.sm})", env.tensorrt_version)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:4])


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = cc.partition(".")
    return int(major), int(minor or 0)


def engine_problems(record: Mapping[str, Any], env: Environment, device: int = 0) -> list[str]:
    """Why the engine described by ``record`` cannot run in ``env`` on CUDA device ``device`` (empty: it can)."""
    problems: list[str] = []
    built_gpu = record.get("gpu", {})
    built_cc = built_gpu.get("compute_capability", "?")
    built_trt = record.get("tensorrt_version", "?")
    gpu = env.gpu(device)
    if gpu is None:
        problems.append(f"no NVIDIA GPU at CUDA device {device} ({env.gpu_error or 'none visible'})")
    else:
        level = record.get("hardware_compatibility", "NONE")
        if level == "AMPERE_PLUS":
            if _cc_tuple(gpu.compute_capability) < (8, 0):
                problems.append(f"the engine needs an Ampere or newer GPU (sm_80+); this is {gpu.name} ({gpu.sm})")
        elif built_cc != gpu.compute_capability:
            problems.append(f"built for {built_gpu.get('name', '?')} (sm_{built_cc.replace('.', '')}), this is "
                            f"{gpu.name} ({gpu.sm})")
    if env.tensorrt_version is None:
        problems.append(env.tensorrt_error or "TensorRT is not installed")
    elif record.get("version_compatible"):
        if _version_tuple(env.tensorrt_version) < _version_tuple(built_trt):
            problems.append(f"the engine is version-compatible from TensorRT {built_trt} on; this is TensorRT "
                            f"{env.tensorrt_version}")
    elif _version_tuple(env.tensorrt_version) != _version_tuple(built_trt):
        problems.append(f"built with TensorRT {built_trt}, this is TensorRT {env.tensorrt_version}")
    return problems


def engine_warnings(record: Mapping[str, Any], env: Environment, device: int = 0) -> list[str]:
    """Things that allow loading but deserve a note (another GPU model of the same compute capability)."""
    gpu = env.gpu(device)
    built = record.get("gpu", {})
    if (gpu is not None and record.get("hardware_compatibility", "NONE") == "NONE"
            and built.get("compute_capability") == gpu.compute_capability and built.get("name") != gpu.name):
        return [f"built on {built.get('name')}, running on {gpu.name} (same {gpu.sm}); TensorRT tunes for the "
                "exact GPU, so speed may differ: rebuild on this GPU for best performance"]
    return []


def check_engines(folder: Path, engines: Mapping[str, Mapping[str, Any]], env: Environment,
                  device: int = 0) -> None:
    """Raise CompatibilityError listing every engine of ``folder`` that cannot run here, with the way out."""
    lines = [f"{name}: {problem}" for name, record in engines.items()
             for problem in engine_problems(record, env, device)]
    for name, record in engines.items():
        for warning in engine_warnings(record, env, device):
            log.warning("%s: %s", name, warning)
    if lines:
        raise CompatibilityError(
            f"the TensorRT engines in {folder} cannot run here:\n  " + "\n  ".join(lines) +
            f"\nRebuild them on this machine with `sdexport build --model <source> --out {folder} --backend "
            "tensorrt` (the ONNX graphs are reused), or load the folder with the ONNX Runtime backend; "
            "`sdexport doctor` shows this machine's GPU and TensorRT"
        )


def verified_plan(folder: Path, record: Mapping[str, Any]) -> Path:
    """The plan file of an engine record after its size and sha256 match; refuse it before TensorRT reads it."""
    path = check_inside(folder, record["plan"])
    if not path.is_file():
        raise ArtifactError(f"engine plan {path} is missing; rebuild with --backend tensorrt")
    size = path.stat().st_size
    if size != record["size"]:
        raise ArtifactError(f"engine plan {path} has {size} bytes, the manifest says {record['size']}: truncated "
                            "or replaced; rebuild with --backend tensorrt")
    if sha256_file(path) != record["sha256"]:
        raise ArtifactError(f"engine plan {path} does not match its sha256 in the manifest: edited or corrupted; "
                            "rebuild with --backend tensorrt")
    return path
