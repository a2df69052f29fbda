"""``sdexport serve``: a FastAPI service over a compiled folder (OpenAI-style API, dynamic batching, metrics)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_PUBLIC = {
    "ServeConfig": "sdexport.serve.config",
    "create_app": "sdexport.serve.app",
    "run_server": "sdexport.serve.lifecycle",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    # Lazy: the CLI imports this package's parser without FastAPI installed.
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'sdexport.serve' has no attribute {name!r}")
