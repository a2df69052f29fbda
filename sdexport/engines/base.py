"""The Engine protocol: named inputs -> named outputs, with declared tensor specs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from sdexport.specs import TensorSpec


@runtime_checkable
class Engine(Protocol):
    """One compiled component. ``run`` takes and returns arrays keyed by the spec's tensor names.

    Host engines take and return numpy arrays. A device engine may also have an ``array_device`` attribute (a
    ``sdexport.engines.arrays.Arrays``): given arrays of that library it returns arrays of it, on the device.
    An engine that computes on the CPU says so with ``on_cpu = True``; the runtime then runs the VAE one image
    per call (``ComponentFiles.cpu_batch``). An engine that keeps working memory between runs may offer
    ``release_memory()``; the runtime calls it on the UNet when the denoising loop ends and on the VAE decoder after
    it decoded.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run once; every declared input must be present, every declared output is returned."""
        ...

