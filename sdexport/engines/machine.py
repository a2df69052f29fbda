"""What CPU this is: its model name and the SIMD features that decide which precisions run fast."""

from __future__ import annotations

import platform
from pathlib import Path

SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_tile",
              "amx_bf16", "amx_int8")


def _cpuinfo_field(prefix: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features in SIMD_FLAGS that the CPU reports (Linux; [] elsewhere)."""
    have = set((_cpuinfo_field("flags") or "").split())
    return [f for f in SIMD_FLAGS if f in have]
