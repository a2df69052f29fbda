"""The environment a benchmark ran in: CPU, cores, memory, GPU, library versions, BLAS kernel, load."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from sdexport.engines.doctor import packages
from sdexport.engines.machine import cpu_flags
from sdexport.engines.machine import cpu_name as cpu_model

# sdexport, every registered backend's packages (the registry, as `sdexport doctor` reports them), and the peers.
LIBRARIES = tuple(dict.fromkeys(("sdexport", *packages(), "torch", "diffusers", "transformers", "optimum",
                                 "optimum-onnx", "optimum-intel", "Pillow", "tokenizers")))
BLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def memory_total_mib() -> int | None:
    """Physical memory in MiB (Linux), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


@functools.cache
def gpus() -> list[str]:
    """NVIDIA GPUs by name and memory (nvidia-smi), or [] when there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries that shape the numbers (missing ones are left out)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def blas_info() -> list[dict[str, Any]]:
    """The BLAS libraries loaded in this process and their kernel (threadpoolctl), or [] without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("internal_api", "version", "architecture", "num_threads", "threading_layer")
    return [{k: info.get(k) for k in keys} for info in threadpool_info() if info.get("user_api") == "blas"]


def environment() -> dict[str, Any]:
    """The environment record attached to every result line."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "memory_mib": memory_total_mib(),
        "gpus": gpus(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions(),
        "blas_env": {k: os.environ[k] for k in BLAS_VARIABLES if k in os.environ},
        "load_average": [round(x, 2) for x in load] if load else None,
    }
