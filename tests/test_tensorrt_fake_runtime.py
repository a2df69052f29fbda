"""The host-memory CUDA stand-in and the strict device arrays of tests/fakes/tensorrt_runtime.py."""

from __future__ import annotations

import numpy as np
import pytest

from fakes.tensorrt_runtime import FakeCuda, StrictArrays, read_host


def test_fake_cuda_copies_and_frees() -> None:
    cuda = FakeCuda()
    data = np.arange(6, dtype=np.float32)
    ptr = cuda.malloc(data.nbytes)
    cuda.copy(ptr, data.ctypes.data, data.nbytes, "htod", 0)
    assert np.array_equal(read_host(ptr, (6,), np.dtype(np.float32)), data)
    cuda.free(ptr)
    assert not cuda.buffers


def test_strict_arrays_refuse_implicit_host_copies() -> None:
    arrays = StrictArrays()
    x = arrays.put(np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises((RuntimeError, TypeError)):
        np.asarray(x)
    y = arrays.xp.concat([x, x * 2.0])
    assert arrays.owns(y) and y.device == arrays.device
    np.testing.assert_array_equal(arrays.get(y)[2:], np.arange(6).reshape(2, 3) * 2)
    assert arrays.pointer(y) == arrays._storage(y).ctypes.data

