"""The CUDA runtime calls the TensorRT engines need (through cuda-python), and device arrays for zero-copy hand-off."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdexport.errors import CompatibilityError, SdexportError


class CudaError(SdexportError):
    """A CUDA runtime call failed."""


class CudaApi:
    """The few CUDA runtime calls the engines need, through cuda-python, with errors turned into CudaError."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt

    def _check(self, result: Any, what: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            message = self.rt.cudaGetErrorString(err)[1]
            raise CudaError(f"{what} failed: {message.decode() if isinstance(message, bytes) else message}")
        return values[0] if len(values) == 1 else values

    def set_device(self, device: int) -> None:
        self._check(self.rt.cudaSetDevice(device), f"cudaSetDevice({device})")

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr), "cudaFree")

    def stream(self) -> Any:
        return self._check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "cudaStreamCreate")

    def destroy_stream(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def synchronize(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def copy(self, dst: int, src: int, nbytes: int, kind: str, stream: Any) -> None:
        """Asynchronous copy; ``kind`` is "htod", "dtoh" or "dtod"."""
        kinds = {"htod": self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                 "dtoh": self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                 "dtod": self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice}
        self._check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kinds[kind], stream), f"cudaMemcpyAsync {kind}")

    def capture(self, stream: Any, work: Callable[[], None]) -> Any:
        """Record ``work`` (enqueued on ``stream``) into an executable CUDA graph; nothing runs yet."""
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(self.rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        try:
            work()
        except BaseException:
            graph = self.rt.cudaStreamEndCapture(stream)[1]  # end the capture so the stream stays usable
            if graph is not None:
                self.rt.cudaGraphDestroy(graph)
            raise
        graph = self._check(self.rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        try:
            return self._check(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            self._check(self.rt.cudaGraphDestroy(graph), "cudaGraphDestroy")

    def launch(self, graph: Any, stream: Any) -> None:
        self._check(self.rt.cudaGraphLaunch(graph, stream), "cudaGraphLaunch")

    def destroy_graph(self, graph: Any) -> None:
        self._check(self.rt.cudaGraphExecDestroy(graph), "cudaGraphExecDestroy")


@functools.cache
def cuda_api() -> CudaApi:
    """The process's CudaApi over cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise CompatibilityError("the TensorRT backend needs cuda-python: pip install 'sdexport[gpu]'") from exc
    return CudaApi(runtime)


@dataclass
class DeviceArray:
    """A typed view of device memory; ``__cuda_array_interface__`` lets CuPy / PyTorch / Numba use it zero-copy."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3,
                "strides": None}


def device_pointer(value: Any) -> tuple[int, tuple[int, ...], np.dtype] | None:
    """(pointer, shape, dtype) of a C-contiguous CUDA array (anything with __cuda_array_interface__), else None."""
    iface = getattr(value, "__cuda_array_interface__", None)
    if iface is None:
        return None
    if iface.get("strides") is not None:
        shape, itemsize = tuple(iface["shape"]), np.dtype(iface["typestr"]).itemsize
        expected = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) * itemsize for i in range(len(shape)))
        if tuple(iface["strides"]) != expected:
            raise ValueError("device inputs must be C-contiguous; call .copy() / ascontiguousarray first")
    return int(iface["data"][0]), tuple(iface["shape"]), np.dtype(iface["typestr"])
