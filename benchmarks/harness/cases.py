"""What is measured: benchmark cases (model, size, steps, batch) and the named suites that group them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
GUIDANCE_SCALE = 7.5


@dataclass(frozen=True)
class Case:
    """One generation setting, run identically by every system (same weights, latents, prompt and scheduler)."""

    model: str
    height: int
    width: int
    steps: int
    batch: int
    guidance_scale: float = GUIDANCE_SCALE
    prompt: str = PROMPT
    seed: int = 0

    @property
    def key(self) -> str:
        """A short unique name, e.g. ``tiny-sd15-64x64-s4-b1``."""
        return f"{self.model}-{self.height}x{self.width}-s{self.steps}-b{self.batch}"

    def latents(self, channels: int = 4, scale: int = 8) -> np.ndarray:
        """The shared initial noise [batch, channels, h/scale, w/scale], float32, from ``seed``."""
        if self.height % scale or self.width % scale:
            raise ValueError(f"{self.key}: height and width must be multiples of {scale}")
        shape = (self.batch, channels, self.height // scale, self.width // scale)
        return np.random.default_rng(self.seed).standard_normal(shape, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Case:
        """Inverse of ``to_dict``."""
        return cls(**data)


@dataclass(frozen=True)
class Suite:
    """A named group of cases on one model, with the build it needs and how hard to measure it."""

    name: str
    model: str
    random_weights: bool
    cases: tuple[Case, ...]
    warmups: int
    repeats: int
    build_height: tuple[int, int, int]
    build_width: tuple[int, int, int]
    description: str


def grid(model: str, size: int, steps: tuple[int, ...], batches: tuple[int, ...]) -> tuple[Case, ...]:
    """Every steps x batch combination at ``size`` x ``size``."""
    return tuple(Case(model, size, size, s, b) for b in batches for s in steps)


def _tiny(model: str) -> Suite:
    return Suite(model, model, False, grid(model, 64, (4, 20), (1, 4)), 2, 7, (32, 64, 256), (32, 64, 256),
                 f"{model} preset at 64x64: per-step overhead dominates")


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        _tiny("tiny-sd15"),
        _tiny("tiny-sdxl"),
        Suite("sd15-256", "sd15", True, grid("sd15", 256, (4,), (1, 4)) + grid("sd15", 256, (20,), (1,)), 0, 2,
              (256, 256, 512), (256, 256, 512), "full SD 1.5 architecture (random weights) at 256x256"),
        Suite("sd15-512", "sd15", True, grid("sd15", 512, (4,), (1,)), 0, 2, (256, 256, 512), (256, 256, 512),
              "full SD 1.5 architecture (random weights) at 512x512"),
        # Both SDXL suites share one folder built for 512-768 px (the build's estimated peak: 17.3 GiB).
        Suite("sdxl-512", "sdxl", True, grid("sdxl", 512, (4,), (1,)), 0, 1, (512, 768, 768), (512, 768, 768),
              "full SDXL base architecture (random weights) at 512x512"),
        Suite("sdxl-768", "sdxl", True, grid("sdxl", 768, (20,), (1,)), 0, 1, (512, 768, 768), (512, 768, 768),
              "full SDXL base architecture (random weights) at 768x768, 20 steps"),
    )
}
DEFAULT_SUITES = ("tiny-sd15", "tiny-sdxl")


def with_overrides(suite: Suite, steps: tuple[int, ...] | None = None, batches: tuple[int, ...] | None = None,
                   warmups: int | None = None, repeats: int | None = None) -> Suite:
    """The suite with its case grid or repeat counts replaced (for quick runs and tests)."""
    cases = suite.cases
    if steps or batches:
        sizes = sorted({(c.height, c.width) for c in cases})
        steps = steps or tuple(sorted({c.steps for c in cases}))
        batches = batches or tuple(sorted({c.batch for c in cases}))
        cases = tuple(Case(suite.model, h, w, s, b) for h, w in sizes for b in batches for s in steps)
    return replace(suite, cases=cases, warmups=suite.warmups if warmups is None else warmups,
                   repeats=suite.repeats if repeats is None else repeats)
