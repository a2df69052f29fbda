"""The runtime half of the fake TensorRT (Runtime, engine, context, refitter) and a host-memory CUDA stand-in.

A fake engine runs its ONNX graph with ONNX Runtime on CPU, reading inputs from and writing outputs to the
addresses the code under test bound with ``set_tensor_address``; a fake "device" allocation is host memory, so
every copy is a real memmove. This exercises sdexport's bookkeeping (profiles, buffers, addresses, graphs, refit)
honestly; it says nothing about TensorRT kernels, which only the ``gpu`` tests run.
"""

from __future__ import annotations

import ctypes
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fakes.tensorrt import NP, FakeTrt, Strict


def read_host(ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape).copy()


def _write(ptr: int, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    ctypes.memmove(ptr, array.ctypes.data, array.nbytes)


class Engine(Strict):
    api_class = "ICudaEngine"

    def __init__(self, trt: FakeTrt, plan: dict[str, Any]) -> None:
        super().__init__(trt)
        inputs, outputs = plan["io"]
        for key, value in (("_plan", plan), ("_inputs", inputs), ("_outputs", outputs), ("_weights", {}),
                           ("_session", None), ("_contexts", []), ("_refits", 0)):
            object.__setattr__(self, key, value)
        trt.engines.append(self)

    @property
    def num_io_tensors(self) -> int:
        return len(self._inputs) + len(self._outputs)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._plan["profiles"])

    @property
    def device_memory_size_v2(self) -> int:
        return 4096 * (1 + len(self._inputs))

    def get_tensor_name(self, i: int) -> str:
        return [t["name"] for t in (*self._inputs, *self._outputs)][i]

    def get_tensor_dtype(self, name: str) -> int:
        info = next(t for t in (*self._inputs, *self._outputs) if t["name"] == name)
        return getattr(self._trt.DataType, info["dtype"])

    def create_execution_context(self, strategy: int) -> Context:
        assert strategy == self._trt.ExecutionContextAllocationStrategy.USER_MANAGED
        context = Context(self)
        self._contexts.append(context)
        return context

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from sdexport.engines.lora import ort_session

        if self._session is None:
            object.__setattr__(self, "_session", ort_session(Path(self._plan["onnx"]), self._weights))
        names = [t["name"] for t in self._outputs]
        return dict(zip(names, self._session.run(names, feeds), strict=True))


class Context(Strict):
    api_class = "IExecutionContext"

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine._trt)
        for key, value in (("_engine", engine), ("_memory", None), ("_profile", None), ("_shapes", {}),
                           ("_addresses", {}), ("_executions", 0)):
            object.__setattr__(self, key, value)

    def set_device_memory(self, ptr: int, size: int) -> None:
        assert size >= self._engine.device_memory_size_v2
        object.__setattr__(self, "_memory", ptr)

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        object.__setattr__(self, "_profile", index)
        return 0 <= index < self._engine.num_optimization_profiles

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        rng = self._engine._plan["profiles"][self._profile][name]
        if not all(lo <= s <= hi for s, lo, hi in zip(shape, rng["min"], rng["max"], strict=True)):
            return False
        self._shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self._shapes:
            return self._shapes[name]
        dtypes = {t["name"]: np.dtype(NP[t["dtype"]]) for t in self._engine._inputs}
        zeros = {n: np.zeros(s, dtype=dtypes[n]) for n, s in self._shapes.items()}
        return tuple(self._engine._run(zeros)[name].shape)

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self._addresses[name] = ptr

    def execute_async_v3(self, stream: int) -> bool:
        assert self._memory is not None, "the context has no device memory"
        feeds = {t["name"]: read_host(self._addresses[t["name"]], self._shapes[t["name"]], np.dtype(NP[t["dtype"]]))
                 for t in self._engine._inputs}
        for name, value in self._engine._run(feeds).items():
            _write(self._addresses[name], value)
        object.__setattr__(self, "_executions", self._executions + 1)
        return True


class Runtime(Strict):
    api_class = "Runtime"

    def __init__(self, trt: FakeTrt, logger: Any) -> None:
        super().__init__(trt)
        object.__setattr__(self, "engine_host_code_allowed", False)

    def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
        self._trt.deserialized += 1
        try:
            return Engine(self._trt, json.loads(data))
        except ValueError:
            return None


class Weights(Strict):
    api_class = "Weights"

    def __init__(self, trt: FakeTrt, array: np.ndarray) -> None:
        super().__init__(trt)
        object.__setattr__(self, "_array", array)


class Refitter(Strict):
    api_class = "Refitter"

    def __init__(self, engine: Engine, logger: Any) -> None:
        super().__init__(engine._trt)
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_pending", {})

    def set_named_weights(self, name: str, weights: Weights) -> bool:
        self._pending[name] = np.array(weights._array)
        return True

    def get_missing_weights(self) -> list[str]:
        # Like a real engine that fused a layer's weight and bias: a changed weight needs its bias too.
        wanted = {n.removesuffix(".weight") + ".bias" for n in self._pending if n.endswith(".weight")}
        return sorted(n for n in wanted if n not in self._pending and n in self._engine._trt.known_biases)

    def refit_cuda_engine(self) -> bool:
        engine = self._engine
        engine._weights.update(self._pending)
        object.__setattr__(engine, "_session", None)
        object.__setattr__(engine, "_refits", engine._refits + 1)
        engine._trt.sent = dict(self._pending)
        return True


class OnnxParserRefitter(Strict):
    api_class = "OnnxParserRefitter"

    def __init__(self, refitter: Refitter, logger: Any) -> None:
        super().__init__(refitter._trt)
        object.__setattr__(self, "_refitter", refitter)

    def refit_from_file(self, path: str) -> bool:
        import onnx

        from sdexport.engines.onnx_weights import read_initializers

        names = [i.name for i in onnx.load(path, load_external_data=False).graph.initializer]
        self._refitter._pending.update(read_initializers(Path(path), names))
        return True


def install_runtime(trt: FakeTrt) -> None:
    """Give a FakeTrt its runtime-side classes."""
    trt.Runtime = lambda logger: Runtime(trt, logger)
    trt.Refitter = lambda engine, logger: Refitter(engine, logger)
    trt.OnnxParserRefitter = OnnxParserRefitter
    trt.Weights = lambda array: Weights(trt, array)
    trt.known_biases = set()


class FakeCuda:
    """The CudaApi interface over host memory: pointers are real addresses, copies are memmoves."""

    def __init__(self) -> None:
        self.buffers: dict[int, ctypes.Array] = {}
        self.calls: Counter[str] = Counter()
        self.graphs: list[Any] = []

    def set_device(self, device: int) -> None:
        self.calls["set_device"] += 1

    def malloc(self, nbytes: int) -> int:
        buffer = ctypes.create_string_buffer(max(nbytes, 1))
        self.buffers[ctypes.addressof(buffer)] = buffer
        self.calls["malloc"] += 1
        return ctypes.addressof(buffer)

    def free(self, ptr: int) -> None:
        del self.buffers[ptr]
        self.calls["free"] += 1

    def stream(self) -> int:
        return 7

    def destroy_stream(self, stream: int) -> None:
        self.calls["destroy_stream"] += 1

    def synchronize(self, stream: int) -> None:
        self.calls["synchronize"] += 1

    def copy(self, dst: int, src: int, nbytes: int, kind: str, stream: int) -> None:
        ctypes.memmove(dst, src, nbytes)
        self.calls[kind] += 1

    def capture(self, stream: int, work: Any) -> Any:
        self.calls["capture"] += 1
        graph = {"work": work, "alive": True}
        self.graphs.append(graph)
        return graph

    def launch(self, graph: Any, stream: int) -> None:
        assert graph["alive"]
        self.calls["launch"] += 1
        graph["work"]()

    def destroy_graph(self, graph: Any) -> None:
        graph["alive"] = False
        self.calls["destroy_graph"] += 1


class StrictArrays:
    """Device arrays for the fake CUDA: array-api-strict arrays on its non-CPU device "device1".

    They refuse any implicit conversion to numpy (so code under test cannot copy them to the host unnoticed), while
    their storage is host memory like FakeCuda's, so engines read and write them by address. ``puts`` / ``gets``
    count the explicit transfers.
    """

    name = "strict-device"
    synchronous = False

    def __init__(self) -> None:
        import array_api_strict

        self.xp = array_api_strict
        self.device = array_api_strict.Device("device1")
        self.puts = 0
        self.gets = 0

    def put(self, host: np.ndarray) -> Any:
        self.puts += 1
        return self.xp.asarray(np.array(host, copy=True, order="C"), device=self.device)

    def get(self, array: Any) -> np.ndarray:
        self.gets += 1
        return np.array(self._storage(array), copy=True)

    def owns(self, value: Any) -> bool:
        from array_api_strict._array_object import Array

        return isinstance(value, Array)

    def scope(self) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def clock(self) -> float:
        import time

        return time.perf_counter()

    def elapsed(self, start: float, end: float) -> float:
        return end - start

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        return self.xp.asarray(np.empty(shape, dtype=dtype), device=self.device)

    def pointer(self, array: Any) -> int:
        storage = self._storage(array)
        if not storage.flags.c_contiguous:
            raise ValueError("device inputs must be C-contiguous")
        return storage.ctypes.data

    def dtype(self, array: Any) -> np.dtype:
        return self._storage(array).dtype

    def _storage(self, array: Any) -> np.ndarray:
        assert array.device == self.device, f"array on {array.device}, expected {self.device}"
        return array._array  # the fake's "device memory": array-api-strict keeps a numpy array inside
