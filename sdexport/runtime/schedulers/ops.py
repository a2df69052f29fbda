"""The few non-arithmetic array operations the schedulers need, for numpy arrays and torch tensors alike."""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any
"""A numpy array or a torch tensor (or anything else with numpy-style arithmetic operators)."""


def is_torch(x: Array) -> bool:
    """Whether ``x`` is a torch tensor, decided without importing torch."""
    return type(x).__module__.startswith("torch")


def clip(x: Array, low: float, high: float) -> Array:
    """Clamp ``x`` to ``[low, high]`` keeping its type, device and dtype."""
    if is_torch(x):
        return x.clamp(low, high)
    return np.clip(x, low, high)


def dynamic_threshold(x: Array, ratio: float, max_value: float) -> Array:
    """Imagen dynamic thresholding of a predicted x0, per batch item (diffusers' ``_threshold_sample``).

    ``s`` is the ``ratio`` quantile of ``|x|`` over all non-batch dims, clamped to ``[1, max_value]``; the
    result is ``clip(x, -s, s) / s``. Computed in float32 at least, returned in the input dtype.
    """
    batch = x.shape[0]
    if is_torch(x):
        dtype = x.dtype
        flat = x.reshape(batch, -1)
        if str(dtype) not in ("torch.float32", "torch.float64"):
            flat = flat.float()
        s = flat.abs().quantile(ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
        return (flat.clamp(-s, s) / s).reshape(x.shape).to(dtype)
    dtype = x.dtype
    flat = x.reshape(batch, -1)
    if dtype not in (np.float32, np.float64):
        flat = flat.astype(np.float32)
    s = np.clip(np.quantile(np.abs(flat), ratio, axis=1), 1, max_value).astype(flat.dtype)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(x.shape).astype(dtype, copy=False)
