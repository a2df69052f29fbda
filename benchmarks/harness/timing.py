"""Per-stage timings of one generation, a proxy that times a component's calls, and their aggregation."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.stats import Summary, summarize


@dataclass
class RunTiming:
    """Seconds spent by one generation: end to end, per stage, and per model evaluation.

    ``steps`` is the wall time of each denoising step when the system reports it (ours); peers leave it empty.
    """

    total: float
    text_encoder: float
    unet: list[float]
    vae_decoder: float
    steps: list[float] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        """UNet calls in this generation."""
        return len(self.unet)

    @property
    def outside_networks(self) -> float:
        """Seconds outside the text encoder, UNet and VAE decoder calls (pre/post-processing, scheduler, CFG)."""
        return self.total - self.text_encoder - sum(self.unet) - self.vae_decoder

    @property
    def step_overheads(self) -> list[float]:
        """Per step: wall time minus UNet engine time (empty when ``steps`` is not reported)."""
        return [s - u for s, u in zip(self.steps, self.unet, strict=False)]


class TimedProxy:
    """Stands in for a model component: forwards everything, and appends the seconds of each ``method`` call to
    ``sink``. Used to split a peer pipeline's time into stages without changing its code."""

    def __init__(self, inner: Any, sink: list[float], method: str = "__call__") -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_sink", sink)
        object.__setattr__(self, "_method", method)

    def _timed(self, *args: Any, **kwargs: Any) -> Any:
        target = self._inner if self._method == "__call__" else getattr(self._inner, self._method)
        t0 = time.perf_counter()
        try:
            return target(*args, **kwargs)
        finally:
            self._sink.append(time.perf_counter() - t0)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._method == "__call__":
            return self._timed(*args, **kwargs)
        return self._inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == self._method:
            return self._timed
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


class StageClock:
    """Timing sinks for the stages of a peer pipeline; ``take(total)`` turns one call's records into a RunTiming."""

    def __init__(self) -> None:
        self.text_encoder: list[float] = []
        self.unet: list[float] = []
        self.vae_decoder: list[float] = []

    def take(self, total: float) -> RunTiming:
        """The RunTiming of the call that just finished; clears the sinks for the next call."""
        run = RunTiming(total, sum(self.text_encoder), list(self.unet), sum(self.vae_decoder))
        self.text_encoder.clear()
        self.unet.clear()
        self.vae_decoder.clear()
        return run


def _maybe(values: Sequence[float]) -> dict[str, Any] | None:
    return summarize(values).to_dict() if values else None


def aggregate(first: RunTiming, runs: Sequence[RunTiming], batch: int) -> dict[str, Any]:
    """Latency metrics of repeated runs (after warm-up): medians and spread per stage, throughput, overheads."""
    if not runs:
        raise ValueError("aggregate needs at least one measured run")
    e2e: Summary = summarize([r.total for r in runs])
    unet_steps = [u for r in runs for u in r.unet]
    overheads = [o for r in runs for o in r.step_overheads]
    outside = [r.outside_networks / max(1, r.evaluations) for r in runs]
    return {
        "first_s": first.total,
        "e2e_s": e2e.to_dict(),
        "text_encoder_s": _maybe([r.text_encoder for r in runs]),
        "unet_step_s": _maybe(unet_steps),
        "unet_total_s": _maybe([sum(r.unet) for r in runs]),
        "vae_decoder_s": _maybe([r.vae_decoder for r in runs]),
        "unet_evaluations": runs[0].evaluations,
        "overhead_step_ms": summarize(overheads).scaled(1e3).to_dict() if overheads else None,
        "outside_networks_step_ms": summarize(outside).scaled(1e3).to_dict(),
        "images_per_s": batch / e2e.median if e2e.median > 0 else None,
    }
