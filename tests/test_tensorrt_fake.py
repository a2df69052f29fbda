"""The fake TensorRT (tests/fakes/tensorrt.py) refuses what the real API version lacks."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from fakes.tensorrt import NEWEST, OLDEST, FakeTrt


def test_fake_refuses_names_the_real_version_lacks() -> None:
    new, old = FakeTrt(NEWEST), FakeTrt(OLDEST)
    assert old.BuilderFlag.FP16 is not None  # 10.x still has it
    with pytest.raises(AttributeError):
        _ = new.BuilderFlag.FP16
    with pytest.raises(AttributeError):
        _ = old.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
    config = new.Builder(None).create_builder_config()
    with pytest.raises(AttributeError):
        config.set_calibration_profile(None)  # removed in 11.x
    with pytest.raises(AttributeError):
        config.int8_calibrator = None
    config.builder_optimization_level = 5  # a real property
    with pytest.raises(AttributeError):
        _ = new.Builder(None).platform_has_fast_fp16


def test_fake_host_memory_pointer_helpers() -> None:
    data = np.arange(4, dtype=np.float32)
    buffer = ctypes.create_string_buffer(data.nbytes)
    ctypes.memmove(ctypes.addressof(buffer), data.ctypes.data, data.nbytes)
    assert np.array_equal(np.frombuffer(buffer.raw, dtype=np.float32), data)

