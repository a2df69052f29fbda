"""sdexport: compile Stable Diffusion pipelines into verified ONNX / TensorRT artifacts and run them leanly."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "build", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import sdexport` must not pull torch (build) or open sessions (Pipeline).
    if name == "Pipeline":
        from sdexport.runtime.pipeline import Pipeline

        return Pipeline
    if name == "build":
        from sdexport.export.build import build

        return build
    raise AttributeError(f"module 'sdexport' has no attribute {name!r}")
