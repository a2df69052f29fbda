"""The lean runtime: numpy, tokenizers, Pillow and engines only; no torch, no diffusers."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_PUBLIC = {
    "Pipeline": "sdexport.runtime.pipeline",
    "GenerationArgs": "sdexport.runtime.args",
    "GenerationResult": "sdexport.runtime.result",
    "GenerationCancelled": "sdexport.runtime.result",
    "NonFiniteError": "sdexport.runtime.result",
    "RequestError": "sdexport.runtime.result",
    "Timings": "sdexport.runtime.result",
    "Backend": "sdexport.engines.registry",
    "register_backend": "sdexport.engines.registry",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    # Lazy: importing the schedulers subpackage must not open ONNX Runtime or read tokenizers.
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'sdexport.runtime' has no attribute {name!r}")
