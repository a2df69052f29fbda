"""The Engine protocol: named inputs -> named outputs, with declared tensor specs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from sdexport.specs import TensorSpec


@runtime_checkable
class Engine(Protocol):
    """One compiled component. ``run`` takes and returns arrays keyed by the spec's tensor names."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run once; every declared input must be present, every declared output is returned."""
        ...


def check_feeds(engine: Engine, feeds: Mapping[str, Any], profile: Mapping[str, Mapping[str, list[int]]]) -> None:
    """Raise ValueError naming the input when a feed is missing or its shape falls outside the profile."""
    for tensor in engine.inputs:
        if tensor.name not in feeds:
            raise ValueError(f"{engine.name}: missing input {tensor.name!r}")
        shape = tuple(feeds[tensor.name].shape)
        rng = profile.get(tensor.name)
        if rng is None:
            continue
        lo, hi = rng["min"], rng["max"]
        if len(shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi, strict=True)):
            raise ValueError(
                f"{engine.name}: input {tensor.name!r} has shape {list(shape)}; this folder was built for "
                f"shapes from {lo} to {hi}"
            )
