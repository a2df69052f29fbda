"""A fresh loopback-only local Ray instance for the opt-in Ray tests: 2 CPUs and 2 logical GPUs (no GPU needed)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-machine mode: every Ray process listens on 127.0.0.1 only
    "RAY_AUTH_MODE": "disabled",  # no token written into the home directory
    "RAY_USAGE_STATS_ENABLED": "0",
}


@contextlib.contextmanager
def local_ray() -> Iterator[Any]:
    """``ray.init(address="local")`` (never a leftover cluster) with RAY_ENV set; shut down and env restored after."""
    saved = {key: os.environ.get(key) for key in RAY_ENV}
    os.environ.update(RAY_ENV)
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
