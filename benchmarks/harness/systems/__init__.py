"""The systems a benchmark compares, opened by name inside a worker process: our runtime and its peers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from harness.cases import Case
from harness.timing import RunTiming

OURS = "sdexport"
EAGER = "diffusers-eager"
EAGER_BF16 = "diffusers-eager-bf16"
COMPILE = "diffusers-compile"
OPTIMUM = "optimum-ort"
OPTIMUM_OV = "optimum-openvino"
OURS_BACKENDS = {OURS: ("onnxruntime", {}), "sdexport-openvino": ("openvino", {"precision": "f32"}),
                 "sdexport-openvino-bf16": ("openvino", {"precision": "bf16"}),
                 "sdexport-openvino-hybrid": ("openvino", {"precision": "hybrid"}),
                 "sdexport-openvino-hybrid-bf16": ("openvino", {"precision": "hybrid-bf16"})}
"""Our runtime as systems: name -> (backend, engine options). The default is ONNX Runtime at fp32; the hybrid ones
run the int8 UNet ``sdexport quantize`` makes in the compiled folder (once, before the suite)."""
QUANTIZED_SYSTEMS = tuple(name for name, (_, options) in OURS_BACKENDS.items()
                          if str(options.get("precision", "")).startswith("hybrid"))
SYSTEM_NAMES = (*OURS_BACKENDS, EAGER, EAGER_BF16, COMPILE, OPTIMUM, OPTIMUM_OV)
VENV_SYSTEMS = {OPTIMUM: "harness.systems.optimum", OPTIMUM_OV: "harness.systems.optimum_intel"}
"""Peers that run in a virtual environment of their own -> the module that exports their folder."""
TORCH_SYSTEMS = (EAGER, EAGER_BF16, COMPILE)
"""Systems that need torch and diffusers in the benchmarking interpreter."""


class Runner(Protocol):
    """One loaded system: ``run`` generates ``case`` from ``latents`` and returns its timings and images."""

    def run(self, case: Case, latents: np.ndarray) -> tuple[RunTiming, np.ndarray]:
        """Timings of one generation and its images as float32 [N, H, W, 3] in [0, 1]."""
        ...

    def info(self) -> dict[str, Any]:
        """backend, precision and scheduler class of what was measured."""
        ...


def open_runner(system: str, paths: Mapping[str, str], options: Mapping[str, Any] | None = None) -> Runner:
    """Load ``system`` from the folders in ``paths`` (compiled / diffusers / optimum / optimum_openvino)."""
    options = dict(options or {})
    if system in OURS_BACKENDS:
        from harness.systems.ours import OursRunner

        backend, engine_options = OURS_BACKENDS[system]
        return OursRunner(paths["compiled"], {**engine_options, **options}, backend)
    if system in TORCH_SYSTEMS:
        from harness.systems.torch_peers import load_diffusers

        return load_diffusers(paths["diffusers"], compile_unet=system == COMPILE, bf16=system == EAGER_BF16)
    if system == OPTIMUM:
        from harness.systems.optimum import load_optimum

        return load_optimum(paths["optimum"])
    if system == OPTIMUM_OV:
        from harness.systems.optimum_intel import load_optimum_intel

        return load_optimum_intel(paths["optimum_openvino"])
    raise ValueError(f"unknown system {system!r}; choose from {SYSTEM_NAMES}")
