"""Score demo pictures from image statistics: background colour, shape colour and shape kind, and their accuracy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdexport.demo.shapes import COLOURS, HELD_OUT, all_combos

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)
_BORDER = 3  # pixels of the frame that give the background colour
_SHAPE_DISTANCE = 80.0  # RGB distance from the background above which a pixel belongs to the shape
_MIN_SHAPE_PIXELS = 30
# An upright triangle holds ~1/4 of its pixels in the top half of its bounding box, a circle or a square ~1/2;
# then the filled fraction of the box tells a square (~1.0) from a circle (~pi/4), with room for soft edges.
_TRIANGLE_TOP = 0.38
_SQUARE_FILL = 0.865


@dataclass(frozen=True)
class Reading:
    """What the evaluator sees in one picture; "none" where it finds no shape."""

    colour: str
    shape: str
    background: str
    fill: float
    top: float

    @property
    def combo(self) -> tuple[str, str, str]:
        """(shape colour, shape, background colour)."""
        return self.colour, self.shape, self.background


def _nearest_colour(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _as_array(image: Any) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB picture of shape [H, W, 3], got an array of shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        pixels = np.clip(pixels * 255.0, 0, 255) if pixels.max() <= 1.0 else pixels
    return pixels.astype(np.float32)


def _box_statistics(mask: np.ndarray) -> tuple[float, float]:
    """(filled fraction, fraction in the top half) of the box of the rows / columns holding >= 2 shape pixels."""
    rows = np.flatnonzero(mask.sum(axis=1) >= 2)
    cols = np.flatnonzero(mask.sum(axis=0) >= 2)
    if rows.size == 0 or cols.size == 0:
        return 0.0, 0.0
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    height = box.shape[0]
    top = box[: height // 2].sum() + (0.5 * box[height // 2].sum() if height % 2 else 0.0)
    return float(box.sum()) / box.size, float(top / box.sum())


def read(image: Any) -> Reading:
    """Classify one picture (PIL image or [H, W, 3] array, uint8 or [0, 1] floats)."""
    pixels = _as_array(image)
    frame = np.concatenate([
        pixels[:_BORDER].reshape(-1, 3), pixels[-_BORDER:].reshape(-1, 3),
        pixels[:, :_BORDER].reshape(-1, 3), pixels[:, -_BORDER:].reshape(-1, 3),
    ])
    bg_rgb = np.median(frame, axis=0)
    background = _nearest_colour(bg_rgb)
    to_bg = np.sqrt(((pixels - bg_rgb) ** 2).sum(axis=2))
    candidates = to_bg > _SHAPE_DISTANCE
    if candidates.sum() < _MIN_SHAPE_PIXELS:
        return Reading("none", "none", background, 0.0, 0.0)
    shape_rgb = np.median(pixels[candidates], axis=0)
    mask = np.sqrt(((pixels - shape_rgb) ** 2).sum(axis=2)) < to_bg
    fill, top = _box_statistics(mask)
    kind = "triangle" if top < _TRIANGLE_TOP else "square" if fill >= _SQUARE_FILL else "circle"
    return Reading(_nearest_colour(shape_rgb), kind, background, fill, top)


@dataclass(frozen=True)
class Score:
    """Accuracy (all three attributes right) over the trained and the held-out combinations."""

    trained_right: int
    trained_total: int
    held_out_right: int
    held_out_total: int

    @staticmethod
    def _pct(right: int, total: int) -> float:
        return 100.0 * right / total if total else float("nan")

    @property
    def trained(self) -> float:
        """Percent right on the trained combinations."""
        return self._pct(self.trained_right, self.trained_total)

    @property
    def held_out(self) -> float:
        """Percent right on the held-out combinations."""
        return self._pct(self.held_out_right, self.held_out_total)

    def summary(self) -> str:
        """One line: both accuracies with their counts."""
        return (f"trained {self.trained:.1f}% ({self.trained_right}/{self.trained_total}), "
                f"held-out {self.held_out:.1f}% ({self.held_out_right}/{self.held_out_total})")


def score(images: Iterable[Any], combos: Sequence[tuple[str, str, str]]) -> Score:
    """Score pictures against the combinations they were asked for (one combination per picture)."""
    counts = {True: [0, 0], False: [0, 0]}
    for image, combo in zip(images, combos, strict=True):
        tally = counts[combo in HELD_OUT]
        tally[0] += read(image).combo == tuple(combo)
        tally[1] += 1
    return Score(counts[False][0], counts[False][1], counts[True][0], counts[True][1])


def prompt_list(trained_per_combo: int = 1, held_out_per_combo: int = 10) -> list[tuple[str, str, str]]:
    """The fixed evaluation list: every trained combination and every held-out one, repeated as asked."""
    out: list[tuple[str, str, str]] = []
    for combo in all_combos():
        out += [combo] * (held_out_per_combo if combo in HELD_OUT else trained_per_combo)
    return out
