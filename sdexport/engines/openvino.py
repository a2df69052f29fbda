"""OpenVINO engine over the folder's ONNX graphs (CPU): f32 by default, thread-safe, LoRA weights by constant swap.

Declares the "openvino" backend; ``openvino`` itself is imported when an engine opens (``pip install
'sdexport[openvino]'``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sdexport.engines.registry import Backend, BackendStatus, Option, register_backend
from sdexport.specs import TensorSpec

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16", "f16")
"""Values of the ``precision`` option (OpenVINO's INFERENCE_PRECISION_HINT). f32 is the default on purpose:
OpenVINO picks bf16 by itself on any CPU with avx512_bf16, which changes the numbers and, without AMX, is slower."""
HINTS = ("latency", "throughput")


def compile_config(precision: str = "f32", threads: int | None = None, streams: int | None = None,
                   hint: str = "latency", cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The compile properties for the CPU plugin, checked; raise ValueError naming the bad option."""
    if precision not in PRECISIONS:
        raise ValueError(f"openvino option precision={precision!r} is not one of {PRECISIONS}")
    if hint not in HINTS:
        raise ValueError(f"openvino option hint={hint!r} is not one of {HINTS}")
    for name, value in (("threads", threads), ("streams", streams)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"openvino option {name}={value!r} must be an integer >= 1")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint.upper()}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    if streams is not None:
        config["NUM_STREAMS"] = streams
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


def replace_constants(model: Any, overrides: Mapping[str, np.ndarray]) -> list[str]:
    """Swap the Constant nodes named after ONNX initializers for ``overrides``; return names not found.

    The ONNX frontend keeps each initializer's name as its Constant's friendly name, and sdexport's graphs hold
    exactly one initializer per parameter (see weight_map.json), so a LoRA-fused weight replaces one node.
    """
    from openvino import opset13

    wanted = dict(overrides)
    for op in model.get_ops():
        name = op.get_friendly_name()
        if op.get_type_name() != "Constant" or name not in wanted:
            continue
        value = np.ascontiguousarray(wanted.pop(name))
        old = op.output(0)
        shape = tuple(old.get_shape())
        if shape != value.shape:
            raise ValueError(f"weight {name}: new shape {value.shape} differs from the graph's {shape}")
        new = opset13.constant(value.astype(old.get_element_type().to_dtype(), copy=False))
        new.set_friendly_name(name)
        old.replace(new.output(0))
    return sorted(wanted)


class OpenVinoEngine:
    """A component compiled by OpenVINO for the CPU, behind the Engine protocol; one infer request per thread."""

    def __init__(self, name: str, graph: Path, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 config: Mapping[str, Any] | None = None,
                 initializer_overrides: Mapping[str, np.ndarray] | None = None) -> None:
        import openvino as ov

        self.name = name
        self.graph = Path(graph)
        self.inputs = inputs
        self.outputs = outputs
        self.config = dict(config or compile_config())
        core = ov.Core()
        model = core.read_model(str(self.graph))
        if initializer_overrides:
            missing = replace_constants(model, initializer_overrides)
            if missing:
                raise ValueError(f"{self.graph}: no weight(s) {missing[:5]} in the graph to replace")
        self.compiled = core.compile_model(model, "CPU", self.config)
        ports = {port.get_any_name(): port for port in self.compiled.outputs}
        absent = [t.name for t in outputs if t.name not in ports]
        if absent:
            raise ValueError(f"{self.graph}: the compiled model has no output(s) {absent}; it has {sorted(ports)}")
        self._ports = [ports[t.name] for t in outputs]
        self._local = threading.local()

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run once on this thread's infer request; returns numpy arrays (copies) keyed by output name."""
        request = self._request()
        request.infer({t.name: np.ascontiguousarray(feeds[t.name]) for t in self.inputs})
        return {t.name: np.array(request.get_tensor(port).data, copy=True)
                for t, port in zip(self.outputs, self._ports, strict=True)}


def open_component(component: Any, options: Mapping[str, Any]) -> OpenVinoEngine:
    """The openvino backend's engine for one component (``ComponentFiles``) of a compiled folder."""
    config = compile_config(options.get("precision", "f32"), options.get("threads"), options.get("streams"),
                            options.get("hint", "latency"), options.get("cache_dir"))
    return OpenVinoEngine(component.name, component.graph, component.spec.inputs, component.spec.outputs, config,
                          options.get("initializer_overrides"))


def probe(device: int = 0) -> BackendStatus:
    """Whether ``openvino`` imports here, its version and devices (``device`` is unused: it runs on the CPU)."""
    try:
        import openvino as ov
    except ImportError as exc:
        return BackendStatus(False, f"openvino is not importable ({exc})")
    return BackendStatus(True, "devices " + ", ".join(ov.Core().available_devices), ov.__version__)


BACKEND = register_backend(Backend(
    name="openvino",
    title="OpenVINO",
    help="runs the exported graphs with OpenVINO on the CPU (f32 unless told otherwise)",
    open=open_component,
    load_options=(
        Option("precision", "OpenVINO's inference precision hint", default="f32", choices=PRECISIONS),
        Option("threads", "inference threads (default: OpenVINO's)", type=int),
        Option("streams", "parallel inference streams (default: OpenVINO's)", type=int),
        Option("hint", "performance hint", default="latency", choices=HINTS),
        Option("cache_dir", "where OpenVINO caches compiled models", type=Path),
        Option("initializer_overrides", "initializer name -> array swapped into the model (LoRA swaps)", cli=False),
    ),
    probe=probe,
    extra="openvino",
    packages=("openvino",),
))
