"""The TensorRT backend: engines built from the graphs after export (``build``), run on the GPU (``runtime``).

This module only declares the backend; ``tensorrt``, CUDA and CuPy are imported by its hooks on first use.
"""

from __future__ import annotations

from pathlib import Path

from sdexport.engines.registry import Backend, Option, register_backend

_HERE = "sdexport.engines.tensorrt"

BUILD_OPTIONS = (
    Option("shapes", "static shape buckets (fastest), one dynamic profile over the ranges, or both",
           default="static", choices=("static", "dynamic", "both")),
    Option("buckets", "a static size bucket; repeatable", kind="repeat", default=[], flag="--bucket", metavar="WxH"),
    Option("refittable", "refittable engines (LoRA hot swap without rebuild)", kind="switch", default=False),
    Option("strip_weights", "weightless plans, refitted from the graphs at load", kind="switch", default=False),
    Option("workspace_gib", "builder workspace limit", type=float),
    Option("optimization_level", "builder optimisation level 0..5", type=int, default=3),
    Option("version_compatible", "plans that load on later TensorRT versions", kind="switch", default=False),
    Option("exclude_lean_runtime", "with --version-compatible: smaller plans", kind="switch", default=False),
    Option("hardware_compatibility", "which GPUs the plans may run on", default="none",
           choices=("none", "same-cc", "ampere+")),
    Option("timing_cache", "timing cache file to reuse across builds", type=Path),
    Option("components", "build engines for these components only", kind="many", flag="--trt-components"),
    Option("device", "CUDA device to build on", type=int, default=0),
    Option("timeout_s", "seconds one engine build may take", type=float, flag="--build-timeout"),
)
LOAD_OPTIONS = (
    Option("device", "CUDA ordinal", type=int, default=0),
    Option("worker", "engines with the same worker index share a stream and scratch memory: give each concurrent "
           "request loop its own", type=int, default=0),
    Option("cuda_graphs", "replay static shapes as CUDA graphs", kind="switch", default=True),
    Option("device_loop", "the denoising loop runs on CuPy arrays on the GPU (False: numpy, through the host)",
           kind="switch", default=True),
)

BACKEND = register_backend(Backend(
    name="tensorrt",
    title="TensorRT",
    help="also builds TensorRT engines from the graphs (needs an NVIDIA GPU)",
    open=f"{_HERE}.runtime:tensorrt_backend",
    load_options=LOAD_OPTIONS,
    build_options=BUILD_OPTIONS,
    make_options=f"{_HERE}.build:options_from",
    preflight=f"{_HERE}.build:preflight",
    compile=f"{_HERE}.build:build_engines",
    probe=f"{_HERE}.compat:backend_status",
    extra="gpu",
    packages=("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "cuda-python", "polygraphy"),
))
