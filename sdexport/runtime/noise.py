"""Per-image random streams: seeded numpy generators, or torch CPU generators drawing exactly like diffusers."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

RNGS = ("numpy", "torch")
"""``numpy``: PCG64 per image (no torch needed). ``torch``: one ``torch.Generator`` per image, as diffusers draws with
``generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]``; needs torch installed."""

MAX_SEED = 2**63 - 1


class NoiseStreams:
    """One random stream per image. Every draw returns float32 [images, *shape], image i from stream i.

    Each image consumes its own stream in the same order whatever the batch, so a batch equals its images generated
    one by one with the same seeds. The draws happen in diffusers' order (initial noise, VAE sampling, scheduler
    noise), so with ``rng="torch"`` the same seeds give diffusers' noise.
    """

    def __init__(self, seeds: Sequence[int], rng: str = "numpy") -> None:
        if rng not in RNGS:
            raise ValueError(f"rng={rng!r} is not one of {RNGS}")
        self.seeds = tuple(int(s) for s in seeds)
        self.rng = rng
        if rng == "numpy":
            self._streams: list[Any] = [np.random.Generator(np.random.PCG64(s)) for s in self.seeds]
            self._torch = None
        else:
            try:
                self._torch = importlib.import_module("torch")
            except ImportError as exc:
                raise ValueError(
                    "rng='torch' draws noise with torch's CPU generator and needs torch installed "
                    "(pip install torch); use rng='numpy' otherwise"
                ) from exc
            self._streams = [self._torch.Generator(device="cpu").manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def draw(self, shape: Sequence[int], images: Sequence[int] | None = None) -> np.ndarray:
        """Standard normal float32 [len(images), *shape]; ``images`` picks the streams (default: all, in order)."""
        picked = range(len(self.seeds)) if images is None else images
        shape = tuple(int(d) for d in shape)
        if self._torch is None:
            parts = [self._streams[i].standard_normal((1, *shape), dtype=np.float32) for i in picked]
        else:
            torch = self._torch
            parts = [torch.randn((1, *shape), generator=self._streams[i], dtype=torch.float32).numpy()
                     for i in picked]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, *shape), np.float32)


def check_seeds(seed: int | Sequence[int] | None, count: int) -> list[int]:
    """One seed per image: an int ``s`` gives s, s+1, ...; a list must have one per image; None draws fresh ones."""
    if seed is None:
        base = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> np.uint64(2))
        return [base + i for i in range(count)]
    if isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        seeds = [int(seed) + i for i in range(count)]
    elif isinstance(seed, Sequence) and not isinstance(seed, str):
        seeds = [int(s) for s in seed]
        if len(seeds) != count:
            raise ValueError(f"seed has {len(seeds)} values; this request makes {count} image(s): pass one per image "
                             "or a single int")
    else:
        raise ValueError(f"seed={seed!r} must be an int, a list of ints (one per image) or None")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"seed {bad[0]} is out of range; allowed: 0 <= seed <= {MAX_SEED}")
    return seeds
