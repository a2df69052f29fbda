"""Where the denoising loop's arrays live: host numpy, or device arrays (CuPy on a CUDA stream) via the array API.

The loop is written against the array API standard (``xp``), so the same code runs on numpy and, with the TensorRT
backend, on CuPy arrays that never leave the GPU between steps. An ``Arrays`` object names the array library and
the only two transfers the pipeline makes explicitly: ``put`` (host -> arrays) and ``get`` (arrays -> host).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import array_api_compat
import array_api_compat.numpy as np_xp
import numpy as np

log = logging.getLogger(__name__)


@runtime_checkable
class Arrays(Protocol):
    """An array library the runtime can compute with, and how data enters and leaves it."""

    name: str
    xp: ModuleType
    """The array-API namespace of these arrays."""
    synchronous: bool
    """Whether reading a value costs nothing (host arrays); device arrays defer checks to avoid a sync per step."""

    def put(self, host: np.ndarray) -> Any:
        """A C-contiguous array of this library holding ``host`` (ordered after work already queued)."""
        ...

    def get(self, array: Any) -> np.ndarray:
        """``array`` as a numpy array (waits for the work that produces it)."""
        ...

    def owns(self, value: Any) -> bool:
        """Whether ``value`` is an array of this library."""
        ...

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """Make this library's stream current for the calling thread while the loop runs."""
        ...

    def clock(self) -> Any:
        """A timestamp taken when the work queued so far has run (a CUDA event on a device; no waiting)."""
        ...

    def elapsed(self, start: Any, end: Any) -> float:
        """Seconds between two ``clock`` marks (waits for ``end`` if needed)."""
        ...


@runtime_checkable
class DeviceArrays(Arrays, Protocol):
    """Arrays in device memory that an engine can read and write by address."""

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """An uninitialised C-contiguous array, ordered on this library's stream."""
        ...

    def pointer(self, array: Any) -> int:
        """The device address of a C-contiguous array's first element (ValueError if it is not contiguous)."""
        ...

    def dtype(self, array: Any) -> np.dtype:
        """The numpy dtype of an array's elements."""
        ...


class HostArrays:
    """numpy arrays in host memory; ``put`` and ``get`` are free."""

    name = "numpy"
    xp: ModuleType = np_xp
    synchronous = True

    def put(self, host: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(host)

    def get(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def owns(self, value: Any) -> bool:
        return isinstance(value, np.ndarray | np.generic)

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def clock(self) -> float:
        return time.perf_counter()

    def elapsed(self, start: float, end: float) -> float:
        return end - start


HOST = HostArrays()
"""The host: what the ONNX Runtime backend and the CPU path use."""


class CupyArrays:
    """CuPy arrays on one CUDA stream (a TensorRT worker's), so that CuPy kernels and engine runs stay in order.

    ``scope`` also holds ``lock`` (the worker's): one request at a time owns the stream, so no other thread's
    kernels can interleave with it, nor land inside a CUDA graph being recorded on it.
    """

    name = "cupy"
    synchronous = False

    def __init__(self, stream: int, device: int = 0, lock: threading.RLock | None = None) -> None:
        import array_api_compat.cupy as cupy_xp
        import cupy

        self.cupy = cupy
        self.xp = cupy_xp
        self.device = device
        self.lock = lock or threading.RLock()
        with cupy.cuda.Device(device):
            self.stream = cupy.cuda.ExternalStream(int(stream), device)

    def put(self, host: np.ndarray) -> Any:
        with self.cupy.cuda.Device(self.device), self.stream:
            return self.cupy.asarray(np.ascontiguousarray(host))

    def get(self, array: Any) -> np.ndarray:
        with self.cupy.cuda.Device(self.device), self.stream:
            return self.cupy.asnumpy(array, stream=self.stream, blocking=True)

    def owns(self, value: Any) -> bool:
        return isinstance(value, self.cupy.ndarray)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """An uninitialised C-contiguous array (from CuPy's stream-ordered memory pool)."""
        with self.cupy.cuda.Device(self.device), self.stream:
            return self.cupy.empty(shape, dtype=dtype)

    def pointer(self, array: Any) -> int:
        """The device address of a C-contiguous array's first element."""
        if not array.flags.c_contiguous:
            raise ValueError("device inputs must be C-contiguous; call cupy.ascontiguousarray first")
        return int(array.data.ptr)

    def dtype(self, array: Any) -> np.dtype:
        return np.dtype(array.dtype)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        with self.lock, self.cupy.cuda.Device(self.device), self.stream:
            yield

    def clock(self) -> Any:
        event = self.cupy.cuda.Event()
        event.record(self.stream)
        return event

    def elapsed(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(self.cupy.cuda.get_elapsed_time(start, end)) / 1000.0


def cupy_arrays(stream: int, device: int = 0, lock: threading.RLock | None = None) -> CupyArrays | None:
    """CupyArrays on ``stream``, or None (with a warning) when CuPy is not installed."""
    try:
        return CupyArrays(stream, device, lock)
    except ImportError as exc:
        log.warning("CuPy is not importable (%s): the denoising loop will copy latents through host memory every "
                    "step; pip install 'sdexport[gpu]' to keep them on the GPU", exc)
        return None


def namespace(*arrays: Any) -> ModuleType:
    """The array-API namespace of ``arrays`` (numpy's for numpy arrays and scalars)."""
    return array_api_compat.array_namespace(*arrays)
