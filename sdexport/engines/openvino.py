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

from sdexport.engines import openvino_precision as precision_probe
from sdexport.engines.memory import PageOut, release_heap
from sdexport.engines.openvino_quantize import KEY, quantized_graph, quiet_nncf
from sdexport.engines.registry import Backend, BackendStatus, Option, register_backend
from sdexport.specs import TensorSpec

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16", "f16", "int8", "hybrid", "hybrid-bf16", "auto")
"""Values of the ``precision`` option. f32, bf16, f16: OpenVINO's INFERENCE_PRECISION_HINT. int8: weights compressed
to int8 by nncf (``sdexport[int8]``), activations f32. hybrid: each component ``sdexport quantize`` made an int8 IR
for (convolutions int8 in weights and activations, calibrated on the folder's own calls) runs that IR, the others
f32; hybrid-bf16: the same with the bf16 hint for everything else. auto: per component, the fastest precision this
CPU offers whose outputs stay within 1% (relative RMS) of f32, measured once and cached (``openvino_precision``).
f32 is the default on purpose: OpenVINO picks bf16 by itself on any CPU with avx512_bf16, which changes the numbers
and, without AMX, is slower."""
HYBRID_HINT = {"hybrid": "f32", "hybrid-bf16": "bf16"}
"""The inference precision hint of each hybrid precision (for the layers the IR keeps in floating point)."""
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
    if precision == "auto":
        raise ValueError("openvino option precision='auto' is resolved per component before compiling")
    hint_precision = "f32" if precision == "int8" else HYBRID_HINT.get(precision, precision)
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint_precision, "PERFORMANCE_HINT": hint.upper()}
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
                 initializer_overrides: Mapping[str, np.ndarray] | None = None, int8_weights: bool = False,
                 keep_memory: bool = False) -> None:
        import openvino as ov

        self.name = name
        self.graph = Path(graph)
        self.inputs = inputs
        self.outputs = outputs
        self.config = dict(config or compile_config())
        self.precision = "int8" if int8_weights else str(self.config["INFERENCE_PRECISION_HINT"])
        self.on_cpu = True
        self.keep_memory = keep_memory
        # OpenVINO maps the weight file and copies each weight while it compiles and on a run with new shapes;
        # the pages it read are handed back meanwhile (PageOut) rather than held beside the copies.
        self._pages = PageOut(self.graph.parent)
        self._shapes: set[tuple[tuple[int, ...], ...]] = set()
        with self._pages:
            core = ov.Core()
            model = core.read_model(str(self.graph))
            if initializer_overrides:
                missing = replace_constants(model, initializer_overrides)
                if missing:
                    raise ValueError(f"{self.graph}: no weight(s) {missing[:5]} in the graph to replace")
            if int8_weights:
                model = compress_int8(model)
            self.compiled = core.compile_model(model, "CPU", self.config)
            del model
        release_heap()
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
        arrays = {t.name: np.ascontiguousarray(feeds[t.name]) for t in self.inputs}
        shapes = tuple(a.shape for a in arrays.values())
        if shapes in self._shapes:
            request.infer(arrays)
        else:
            with self._pages:
                request.infer(arrays)
            self._shapes.add(shapes)
        return {t.name: np.array(request.get_tensor(port).data, copy=True)
                for t, port in zip(self.outputs, self._ports, strict=True)}

    def release_memory(self) -> bool:
        """Free the intermediate tensors OpenVINO keeps between runs; False (and nothing freed) while one runs.

        Called by the runtime when the denoising loop ends, so the UNet does not hold them through the VAE decode
        (SD 1.5 at 512 px: about 500 MiB), and after the decode, so the decoder does not hold them through the next
        generation's UNet (about 1350 MiB). Not after every run: the next run allocates them again (measured: the
        512 px decode after a release 10.4 s instead of 8.2-8.6 s). With ``keep_memory`` nothing is released.
        """
        if self.keep_memory:
            return False
        try:
            self.compiled.release_memory()
        except RuntimeError as exc:  # OpenVINO refuses while an infer request of this model is running
            log.debug("%s: intermediate memory kept (%s)", self.name, str(exc).strip()[:200])
            return False
        return True


def compress_int8(model: Any) -> Any:
    """``model`` with its weights compressed to int8 (asymmetric, per channel) by nncf; activations stay f32."""
    try:
        import nncf
    except ImportError:
        raise ValueError("openvino option precision='int8' needs nncf: pip install 'sdexport[int8]'") from None
    with quiet_nncf():
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


def _graph_at(component: Any, options: Mapping[str, Any], precision: str) -> Path:
    """The graph to compile: the component's ONNX, or under a hybrid precision its quantised IR where it has one."""
    if precision not in HYBRID_HINT or (KEY not in component.record and component.name != "unet"):
        return Path(component.graph)  # a hybrid precision needs the UNet's IR; the other components may lack one
    if options.get("initializer_overrides"):
        raise ValueError(f"{component.name}: LoRAs cannot be swapped into a quantised graph; fuse them at build "
                         "time (sdexport build --lora) and quantize again, or use precision f32 / bf16 / int8")
    return quantized_graph(component.folder, component.name, component.record)


def _open_at(component: Any, options: Mapping[str, Any], precision: str) -> OpenVinoEngine:
    config = compile_config(precision, options.get("threads"), options.get("streams"),
                            options.get("hint", "latency"), options.get("cache_dir"))
    graph = _graph_at(component, options, precision)
    engine = OpenVinoEngine(component.name, graph, component.spec.inputs, component.spec.outputs, config,
                            options.get("initializer_overrides"), int8_weights=precision == "int8",
                            keep_memory=bool(options.get("keep_memory", False)))
    # a hybrid precision on a component without an IR ran its ONNX at that precision's hint: say so
    engine.precision = HYBRID_HINT[precision] if precision in HYBRID_HINT and graph == component.graph else precision
    return engine


def auto_precision(component: Any, options: Mapping[str, Any]) -> precision_probe.Choice:
    """``precision='auto'`` for one component: the cached choice for this machine, else measured now and cached."""
    import openvino as ov

    candidates = precision_probe.offered(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    feeds = precision_probe.sample_feeds(component.spec.inputs, component.profile)

    def measure() -> precision_probe.Choice:
        log.info("%s: measuring precisions f32, %s once for this machine", component.name, ", ".join(candidates))
        return precision_probe.choose(lambda p: _open_at(component, options, p), candidates, feeds)

    machine = precision_probe.machine_key(ov.__version__)
    return precision_probe.cached_choice(machine, str(component.record.get("key", component.graph)), measure)


def open_component(component: Any, options: Mapping[str, Any]) -> OpenVinoEngine:
    """The openvino backend's engine for one component (``ComponentFiles``) of a compiled folder."""
    precision = options.get("precision", "f32")
    if precision == "auto":
        choice = auto_precision(component, options)
        log.info("%s: precision auto -> %s", component.name, choice.describe())
        precision = choice.precision
    return _open_at(component, options, precision)


def probe(device: int = 0) -> BackendStatus:
    """Whether ``openvino`` imports here, its version and devices (``device`` is unused: it runs on the CPU)."""
    try:
        import openvino as ov
    except ImportError as exc:
        return BackendStatus(False, f"openvino is not importable ({exc})")
    core = ov.Core()
    reduced = precision_probe.offered(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    chosen = precision_probe.read_cache().get(precision_probe.machine_key(ov.__version__), {})
    picks = sorted({entry.get("precision", "?") for entry in chosen.values() if isinstance(entry, dict)})
    hybrid = ", hybrid (after sdexport quantize)" if precision_probe.nncf_available() else ""
    detail = (f"devices {', '.join(core.available_devices)}; precisions f32{''.join(', ' + p for p in reduced)}"
              f"{hybrid}; "
              f"auto cache: {len(chosen)} component(s) measured here" + (f" ({', '.join(picks)})" if picks else ""))
    return BackendStatus(True, detail, ov.__version__)


BACKEND = register_backend(Backend(
    name="openvino",
    title="OpenVINO",
    help="runs the exported graphs with OpenVINO on the CPU (f32 unless told otherwise)",
    open=open_component,
    load_options=(
        Option("precision", "f32; bf16 / f16 (OpenVINO's inference precision hint); int8 (weights, needs nncf); "
               "hybrid / hybrid-bf16 (the int8 IR `sdexport quantize` made, f32 / bf16 elsewhere); "
               "auto (per component, the fastest within 1%% of f32 on this CPU, measured once and cached)",
               default="f32", choices=PRECISIONS),
        Option("threads", "inference threads (default: OpenVINO's)", type=int),
        Option("streams", "parallel inference streams (default: OpenVINO's)", type=int),
        Option("hint", "performance hint", default="latency", choices=HINTS),
        Option("cache_dir", "where OpenVINO caches compiled models", type=Path),
        Option("keep_memory", "keep each model's intermediate tensors between generations: faster (SD 1.5 512 px: "
               "about 2 s per picture), higher peak memory", kind="switch", default=False),
        Option("initializer_overrides", "initializer name -> array swapped into the model (LoRA swaps)", cli=False),
    ),
    probe=probe,
    extra="openvino",
    packages=("openvino",),
))
