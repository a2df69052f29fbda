"""The thin layer that touches ``tensorrt``: build a plan (in a child process), deserialize, refit.

Decisions are made elsewhere (``build.decide``, ``profiles``); this module applies them. ``tensorrt`` is
imported lazily, so importing sdexport never needs it. Every TensorRT attribute used here and in ``runtime``
is listed in ``api_names.txt`` and checked against the real bindings by ``tests/test_tensorrt_api.py``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from sdexport.engines.artifacts import atomic_write_bytes
from sdexport.errors import CompatibilityError, SdexportError

log = logging.getLogger(__name__)


class RefitError(SdexportError):
    """TensorRT refused new weights for an engine."""


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or CompatibilityError saying how to install it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise CompatibilityError(
            f"TensorRT is not importable ({exc}). Install it on a machine with an NVIDIA GPU: "
            "pip install 'sdexport[gpu]' (see docs/gpu.md), or use the ONNX Runtime backend"
        ) from exc
    return tensorrt


@functools.cache
def trt_logger(trt: ModuleType) -> Any:
    """One TensorRT logger per process (warnings and errors only)."""
    return trt.Logger(trt.Logger.WARNING)


def network_flags(trt: ModuleType, names: Sequence[str]) -> int:
    """The ``create_network`` bit mask of NetworkDefinitionCreationFlag member names."""
    mask = 0
    for name in names:
        mask |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    return mask


def apply_config(trt: ModuleType, builder: Any, config: Any, decisions: Mapping[str, Any],
                 profiles: Sequence[Mapping[str, Any]]) -> None:
    """Set flags, memory pool, optimisation level, hardware compatibility and profiles on a builder config."""
    for flag in decisions["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if decisions["workspace_bytes"] is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, decisions["workspace_bytes"])
    config.builder_optimization_level = decisions["optimization_level"]
    level = getattr(trt.HardwareCompatibilityLevel, decisions["hardware_compatibility"], None)
    if level is None:
        raise CompatibilityError(f"this TensorRT ({trt.__version__}) has no hardware compatibility level "
                                 f"{decisions['hardware_compatibility']}; upgrade TensorRT or drop the option")
    config.hardware_compatibility_level = level
    for index, spec in enumerate(profiles):
        profile = builder.create_optimization_profile()
        for name, rng in spec["shapes"].items():
            profile.set_shape(name, rng["min"], rng["opt"], rng["max"])
        added = config.add_optimization_profile(profile)
        if added != index:
            raise SdexportError(f"TensorRT rejected optimisation profile {spec['label']} (got index {added})")


def parse_onnx(trt: ModuleType, network: Any, path: str) -> Any:
    """Parse an ONNX file (and its external data) into ``network``; raise with the parser's errors."""
    parser = trt.OnnxParser(network, trt_logger(trt))
    if not parser.parse_from_file(path):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise SdexportError(f"TensorRT's ONNX parser rejected {path}:\n  " + "\n  ".join(errors))
    return parser


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    from filelock import FileLock  # build side only (export extra); the runtime imports this module for refit

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.parent / (path.name + ".lock")):
        yield


def load_timing_cache(config: Any, path: Path) -> Any:
    """Attach the timing cache stored at ``path`` (or a new one) to the builder config."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        log.warning("timing cache %s was made on another GPU or TensorRT; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, True)
    return cache


def save_timing_cache(config: Any, cache: Any, path: Path) -> None:
    """Merge ``cache`` into the file at ``path`` (other builds may have added to it meanwhile) and write it."""
    with _locked(path):
        if path.is_file():
            merged = config.create_timing_cache(path.read_bytes())
            merged.combine(cache, True)
            cache = merged
        atomic_write_bytes(path, bytes(cache.serialize()))


def tensor_io(trt: ModuleType, network: Any) -> list[dict[str, Any]]:
    """Name, direction, dtype (numpy name) and shape (-1 for dynamic) of every network input and output."""
    out = []
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            tensor = get(i)
            out.append({"name": tensor.name, "mode": mode, "dtype": np.dtype(trt.nptype(tensor.dtype)).name,
                        "shape": list(tensor.shape)})
    return out


def build_plan(job: Any) -> dict[str, Any]:
    """Build and write one serialized engine (runs in the builder child process); returns what was built."""
    trt = import_tensorrt()
    from sdexport.engines.tensorrt.cuda import cuda_api

    if job.device:
        cuda_api().set_device(job.device)
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, job.decisions["network_flags"]))
    parser = parse_onnx(trt, network, job.onnx_path)  # owns the weights: keep it alive until the build is done
    config = builder.create_builder_config()
    apply_config(trt, builder, config, job.decisions, job.profiles)
    cache_path = Path(job.timing_cache) if job.timing_cache else None
    cache = load_timing_cache(config, cache_path) if cache_path else None
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SdexportError(f"TensorRT could not build {job.component} from {job.onnx_path}; the builder log above "
                            "says why (often too little workspace: raise --workspace-gib)")
    atomic_write_bytes(Path(job.plan_path), memoryview(plan))
    if cache is not None and cache_path is not None:
        save_timing_cache(config, cache, cache_path)
    io = tensor_io(trt, network)
    del parser, network
    return {"tensorrt_version": trt.__version__, "io": io, "timing_cache": job.timing_cache, "bytes": plan.nbytes}


@functools.cache
def trt_runtime(trt: ModuleType, host_code_allowed: bool) -> Any:
    """One TensorRT Runtime per process and setting (only call after a GPU has been found)."""
    runtime = trt.Runtime(trt_logger(trt))
    runtime.engine_host_code_allowed = host_code_allowed
    return runtime


def deserialize(plan_path: Path, record: Mapping[str, Any], graph: Path | None = None) -> Any:
    """Deserialize a verified plan into an ICudaEngine; refit a weight-stripped plan from its ONNX graph."""
    trt = import_tensorrt()
    runtime = trt_runtime(trt, bool(record.get("host_code_allowed")))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise CompatibilityError(f"TensorRT could not deserialize {plan_path} (see its log above); rebuild it on this "
                                 "machine with `sdexport build ... --backend tensorrt`")
    if record.get("stripped"):
        if graph is None:
            raise SdexportError(f"{plan_path} was built without weights; its ONNX graph is needed to load it")
        refitter = trt.Refitter(engine, trt_logger(trt))
        onnx_refitter = trt.OnnxParserRefitter(refitter, trt_logger(trt))
        if not onnx_refitter.refit_from_file(str(graph)) or not refitter.refit_cuda_engine():
            raise RefitError(f"could not load the weights of {plan_path} from {graph}")
    return engine


def refit(engine: Any, weights: Mapping[str, np.ndarray], lookup: Callable[[str], np.ndarray]) -> list[str]:
    """Set ``weights`` (initializer name -> array) on a refittable engine, then refit it.

    TensorRT may ask for more weights than were changed (e.g. ones it fused with a changed weight): those come
    from ``lookup`` (the current value of any initializer). Returns the names that were sent.
    """
    trt = import_tensorrt()
    refitter = trt.Refitter(engine, trt_logger(trt))
    keep: list[np.ndarray] = []  # trt.Weights does not own the memory: keep every array alive until the refit

    def send(name: str, value: np.ndarray) -> None:
        array = np.ascontiguousarray(value)
        keep.append(array)
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise RefitError(f"TensorRT refused new weights for {name!r} {array.dtype}{list(array.shape)}; is the "
                             "engine refittable (--refittable) and built from this graph?")

    for name, value in weights.items():
        send(name, value)
    extra = [n for n in refitter.get_missing_weights() if n not in weights]
    for name in extra:
        send(name, lookup(name))
    if not refitter.refit_cuda_engine():
        raise RefitError(f"TensorRT could not refit the engine with {len(keep)} weights (see its log above)")
    return [*weights, *extra]
