"""Engines: turn ONNX graphs into something that runs (ONNX Runtime, TensorRT); no diffusers. THE backend registry."""

from sdexport.engines.registry import (
    Backend,
    BackendStatus,
    Option,
    backend_names,
    backends,
    get_backend,
    register_backend,
    unregister_backend,
)

__all__ = ["Backend", "BackendStatus", "Option", "backend_names", "backends", "get_backend", "register_backend",
           "unregister_backend"]
