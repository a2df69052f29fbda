"""TensorRT execution behind the Engine protocol: per-worker stream and scratch memory, per-shape buffers, CUDA graphs.

Each input shape gets its own execution context and device buffers (allocated once), CUDA graphs replay static
shapes, and device arrays (CuPy, on the worker's stream) go in and out without host round trips, so the runtime's
denoising loop runs on the GPU.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdexport.engines.arrays import DeviceArrays, cupy_arrays
from sdexport.engines.artifacts import check_inside, read_manifest
from sdexport.engines.tensorrt import compat, layer
from sdexport.engines.tensorrt.cuda import CudaApi, DeviceArray, cuda_api, device_pointer
from sdexport.engines.tensorrt.profiles import ProfileSpec, select_profile
from sdexport.errors import CompatibilityError, SdexportError
from sdexport.specs import ComponentSpec, ModelSpec

log = logging.getLogger(__name__)

MAX_BINDINGS = 8  # input shapes kept ready per engine and worker (an SD request uses one or two per engine)


@dataclass
class TrtComponent:
    """One deserialized engine, shared by every worker of the process."""

    name: str
    engine: Any
    record: dict[str, Any]
    spec: ComponentSpec
    profiles: list[ProfileSpec]
    dtypes: dict[str, np.dtype]
    weights_version: int = 0

    def refit(self, weights: Mapping[str, np.ndarray], lookup: Callable[[str], np.ndarray]) -> list[str]:
        """Refit changed weights (call between requests); every worker re-captures its CUDA graphs after it."""
        if not self.record.get("refittable"):
            raise CompatibilityError(f"{self.name}: this engine is not refittable; rebuild with --refittable to "
                                     "swap LoRAs without a rebuild")
        sent = layer.refit(self.engine, weights, lookup)
        self.weights_version += 1
        return sent


def load_components(folder: Path, manifest: Mapping[str, Any], names: list[str] | None = None,
                    device: int = 0, env: compat.Environment | None = None) -> dict[str, TrtComponent]:
    """Check the folder's engines against this machine, verify each plan's hash, then deserialize them."""
    engines = manifest.get("engines") or {}
    names = names or list(engines)
    missing = [n for n in names if n not in engines]
    if missing:
        raise CompatibilityError(f"{folder} has no TensorRT engine for {missing}; build them with "
                                 f"`sdexport build ... --out {folder} --backend tensorrt`")
    compat.check_engines(folder, {n: engines[n] for n in names}, env or compat.probe_environment(), device)
    trt = layer.import_tensorrt()
    cuda_api().set_device(device)
    spec = ModelSpec.from_dict(manifest["model"])
    plans = {name: compat.verified_plan(folder, engines[name]) for name in names}  # all, before TensorRT runs
    out = {}
    for name, plan in plans.items():
        record = engines[name]
        graph = check_inside(folder, manifest["components"][name]["graph"])
        engine = layer.deserialize(plan, record, graph)
        dtypes = {}
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            dtypes[tensor] = np.dtype(trt.nptype(engine.get_tensor_dtype(tensor)))
        declared = {t.name for t in (*spec.components[name].inputs, *spec.components[name].outputs)}
        if declared != set(dtypes):
            raise CompatibilityError(f"{plan} has tensors {sorted(dtypes)}, the component declares "
                                     f"{sorted(declared)}; rebuild the engine")
        profiles = [ProfileSpec.from_dict(p) for p in record["profiles"]]
        if engine.num_optimization_profiles != len(profiles):
            raise CompatibilityError(f"{plan} has {engine.num_optimization_profiles} profiles, the manifest "
                                     f"{len(profiles)}; rebuild the engine")
        out[name] = TrtComponent(name, engine, dict(record), spec.components[name], profiles, dtypes)
    return out


@dataclass
class _Binding:
    """One input shape ready to run: its context, device buffers, and (once captured) its CUDA graph."""

    context: Any
    buffers: dict[str, DeviceArray]
    runs: int = 0
    graph: Any = None
    graph_version: int = -1


def device_arrays(worker: Worker) -> DeviceArrays | None:
    """The array library the worker's engines exchange device arrays in: CuPy on the worker's stream, if installed."""
    return cupy_arrays(int(worker.stream), worker.device, worker.lock)


@dataclass
class Worker:
    """One concurrent worker: a CUDA stream, one scratch allocation shared by all its engines' contexts, and the
    device arrays (CuPy on that stream) its engines take and return.

    Contexts of one worker run one after another on its stream, so they can share the scratch memory. ``lock``
    serialises the worker's users: every engine run holds it, and so does a request's whole GPU loop (through its
    arrays' ``scope``). Threads sharing a worker are safe but take turns; give concurrent requests separate workers.
    """

    components: Mapping[str, TrtComponent]
    cuda: CudaApi | None = None
    device: int = 0
    stream: Any = None
    scratch: int = 0
    scratch_bytes: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)
    _arrays: DeviceArrays | None = None
    _arrays_made: bool = False

    def __post_init__(self) -> None:
        self.cuda = self.cuda or cuda_api()
        self.stream = self.cuda.stream()
        self.scratch_bytes = max((int(c.engine.device_memory_size_v2) for c in self.components.values()), default=0)
        self.scratch = self.cuda.malloc(self.scratch_bytes)

    @property
    def arrays(self) -> DeviceArrays | None:
        """This worker's device arrays (made on first use), or None without CuPy."""
        with self.lock:
            if not self._arrays_made:
                self._arrays, self._arrays_made = device_arrays(self), True
            return self._arrays

    def engines(self, cuda_graphs: bool = True, device_loop: bool = True) -> dict[str, TensorRTEngine]:
        """One TensorRTEngine per component, all on this worker's stream and scratch memory."""
        return {n: TensorRTEngine(c, self, cuda_graphs, device_loop) for n, c in self.components.items()}

    def synchronize(self) -> None:
        """Wait for everything queued on this worker's stream."""
        self.cuda.synchronize(self.stream)

    def close(self) -> None:
        """Free the scratch memory and the stream (close this worker's engines first)."""
        self.synchronize()
        self.cuda.free(self.scratch)
        self.cuda.destroy_stream(self.stream)


class TensorRTEngine:
    """A TensorRT engine behind the Engine protocol.

    ``run`` accepts numpy arrays, the worker's device arrays (CuPy) or any CUDA array (``__cuda_array_interface__``).
    Outputs live where the inputs do: numpy for numpy inputs; new device arrays of ``array_device`` when any input is
    on the device (copied on the GPU from the engine's buffers, so they stay valid after the next run).
    ``device_loop=False`` sets ``array_device`` to None, so the runtime keeps its loop on the host.
    """

    def __init__(self, component: TrtComponent, worker: Worker, cuda_graphs: bool = True,
                 device_loop: bool = True) -> None:
        self.component = component
        self.worker = worker
        self.name = component.name
        self.inputs = component.spec.inputs
        self.outputs = component.spec.outputs
        self.cuda_graphs = cuda_graphs
        self.device_loop = device_loop
        self._bindings: OrderedDict[tuple[Any, ...], _Binding] = OrderedDict()

    @property
    def array_device(self) -> DeviceArrays | None:
        """The device arrays this engine takes and returns (the worker's CuPy arrays), or None: host loop."""
        return self.worker.arrays if self.device_loop else None

    def _binding(self, shapes: dict[str, tuple[int, ...]]) -> _Binding:
        key = tuple(sorted(shapes.items()))
        binding = self._bindings.get(key)
        if binding is not None:
            self._bindings.move_to_end(key)
            return binding
        trt = layer.import_tensorrt()
        profile = select_profile(self.name, self.component.profiles, shapes)
        cuda, stream = self.worker.cuda, self.worker.stream
        context = self.component.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self.worker.scratch, self.worker.scratch_bytes)
        if not context.set_optimization_profile_async(profile, int(stream)):
            raise SdexportError(f"{self.name}: TensorRT refused optimisation profile {profile}")
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise ValueError(f"{self.name}: TensorRT refused input {name!r} shape {list(shape)}")
        buffers = {}
        for tensor in (*self.inputs, *self.outputs):
            shape = shapes.get(tensor.name) or tuple(context.get_tensor_shape(tensor.name))
            if any(d < 0 for d in shape):
                raise SdexportError(f"{self.name}: output {tensor.name!r} shape {shape} is not known before running")
            array = DeviceArray(0, tuple(shape), self.component.dtypes[tensor.name])
            array.ptr = cuda.malloc(array.nbytes)
            buffers[tensor.name] = array
            context.set_tensor_address(tensor.name, array.ptr)
        binding = _Binding(context, buffers)
        self._bindings[key] = binding
        if len(self._bindings) > MAX_BINDINGS:
            self._release(self._bindings.popitem(last=False)[1])
        return binding

    def _release(self, binding: _Binding) -> None:
        self.worker.synchronize()
        if binding.graph is not None:
            self.worker.cuda.destroy_graph(binding.graph)
        for array in binding.buffers.values():
            self.worker.cuda.free(array.ptr)

    def _execute(self, binding: _Binding) -> None:
        if not binding.context.execute_async_v3(int(self.worker.stream)):
            raise SdexportError(f"{self.name}: TensorRT execution failed (see its log above)")

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run once on the worker's stream (holding the worker's lock); inputs may be numpy or CUDA arrays."""
        with self.worker.lock:
            return self._run(feeds)

    def _run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        shapes = {}
        for tensor in self.inputs:
            if tensor.name not in feeds:
                raise ValueError(f"{self.name}: missing input {tensor.name!r}")
            shapes[tensor.name] = tuple(int(d) for d in feeds[tensor.name].shape)
        binding = self._binding(shapes)
        cuda, stream = self.worker.cuda, self.worker.stream
        on_device = False
        for tensor in self.inputs:
            on_device = self._upload(binding.buffers[tensor.name], feeds[tensor.name]) or on_device
        version = self.component.weights_version
        if binding.graph is not None and binding.graph_version != version:
            cuda.destroy_graph(binding.graph)  # weights were refit: record again
            binding.graph = None
        if binding.graph is not None:
            cuda.launch(binding.graph, stream)
        elif self.cuda_graphs and binding.runs >= 1:
            # The first run after setting shapes may do one-off work that must not be recorded; record the second.
            binding.graph = cuda.capture(stream, lambda: self._execute(binding))
            binding.graph_version = version
            cuda.launch(binding.graph, stream)
        else:
            self._execute(binding)
        binding.runs += 1
        return self._device_results(binding) if on_device else self._results(binding)

    def _device_input(self, value: Any) -> tuple[int, np.dtype] | None:
        if isinstance(value, np.ndarray):
            return None
        arrays = self.worker.arrays
        if arrays is not None and arrays.owns(value):
            return arrays.pointer(value), arrays.dtype(value)
        device = device_pointer(value)
        return None if device is None else (device[0], device[2])

    def _upload(self, target: DeviceArray, value: Any) -> bool:
        """Copy one input into its bound buffer; True when it came from device memory."""
        cuda, stream = self.worker.cuda, self.worker.stream
        device = self._device_input(value)
        if device is not None:
            ptr, dtype = device
            if dtype != target.dtype:
                raise ValueError(f"{self.name}: device input has dtype {dtype}, the engine takes {target.dtype}")
            cuda.copy(target.ptr, ptr, target.nbytes, "dtod", stream)
            return True
        host = np.ascontiguousarray(value, dtype=target.dtype)
        if host.shape != target.shape:
            raise ValueError(f"{self.name}: input shape {list(host.shape)} != bound shape {list(target.shape)}")
        # From pageable host memory, cudaMemcpyAsync returns only once the data is staged, so ``host`` may go.
        cuda.copy(target.ptr, host.ctypes.data, target.nbytes, "htod", stream)
        return False

    def _device_results(self, binding: _Binding) -> dict[str, Any]:
        arrays = self.worker.arrays
        if arrays is None:
            raise SdexportError(f"{self.name}: device inputs need CuPy for device outputs: pip install "
                                "'sdexport[gpu]', or pass numpy arrays")
        out = {}
        for tensor in self.outputs:
            buffer = binding.buffers[tensor.name]
            array = arrays.empty(buffer.shape, buffer.dtype)
            self.worker.cuda.copy(arrays.pointer(array), buffer.ptr, buffer.nbytes, "dtod", self.worker.stream)
            out[tensor.name] = array
        return out

    def _results(self, binding: _Binding) -> dict[str, Any]:
        out = {}
        for tensor in self.outputs:
            array = binding.buffers[tensor.name]
            host = np.empty(array.shape, dtype=array.dtype)
            self.worker.cuda.copy(host.ctypes.data, array.ptr, array.nbytes, "dtoh", self.worker.stream)
            out[tensor.name] = host
        self.worker.synchronize()
        return out

    def close(self) -> None:
        """Free this engine's buffers and graphs on its worker."""
        while self._bindings:
            self._release(self._bindings.popitem()[1])


@dataclass
class TrtSession:
    """A folder's engines, deserialized once per process, and its workers (one per concurrent worker index)."""

    components: dict[str, TrtComponent]
    device: int = 0
    workers: dict[int, Worker] = field(default_factory=dict)

    def worker(self, index: int = 0) -> Worker:
        """The worker with this index (created on first use: its own stream and scratch memory)."""
        if index not in self.workers:
            self.workers[index] = Worker(self.components, device=self.device)
        return self.workers[index]


_SESSIONS: dict[tuple[Path, int], TrtSession] = {}
_SESSIONS_LOCK = threading.Lock()


def open_session(folder: Path, device: int = 0) -> TrtSession:
    """The process's TrtSession of ``folder`` on CUDA device ``device`` (checked and deserialized once)."""
    key = (Path(folder).resolve(), device)
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = TrtSession(load_components(key[0], read_manifest(key[0]), device=device), device=device)
        return _SESSIONS[key]


def tensorrt_backend(component: Any, options: Mapping[str, Any]) -> TensorRTEngine:
    """The tensorrt backend's ``open`` hook (declared in ``sdexport.engines.tensorrt``, which checks the options).

    ``component`` needs ``name`` and ``graph`` (``<folder>/<component>/model.onnx``); the options and their
    defaults are ``sdexport.engines.tensorrt.LOAD_OPTIONS``.
    """
    session = open_session(Path(component.graph).parent.parent, int(options.get("device", 0)))
    if component.name not in session.components:
        raise CompatibilityError(f"the folder has no TensorRT engine for {component.name}; rebuild it with "
                                 "--backend tensorrt")
    worker = session.worker(int(options.get("worker", 0)))
    return TensorRTEngine(session.components[component.name], worker, bool(options.get("cuda_graphs", True)),
                          bool(options.get("device_loop", True)))
