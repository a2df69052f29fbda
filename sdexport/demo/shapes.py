"""The demo's synthetic data: seeded PIL drawings of one coloured shape on a plain background, with their captions."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 64

# (shape colour, shape, background colour) never shown in training; every colour, shape and background still is.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset({
    ("green", "square", "white"),
    ("blue", "triangle", "yellow"),
    ("yellow", "circle", "black"),
    ("white", "triangle", "red"),
    ("black", "square", "green"),
    ("red", "triangle", "white"),
    ("green", "circle", "blue"),
    ("blue", "square", "black"),
    ("yellow", "triangle", "green"),
    ("white", "circle", "blue"),
})


@dataclass(frozen=True)
class Scene:
    """One drawing: a shape of a colour on a background of another colour, placed at (cx, cy) with half-size r."""

    colour: str
    shape: str
    background: str
    cx: int = IMAGE_SIZE // 2
    cy: int = IMAGE_SIZE // 2
    r: int = 18

    @property
    def combo(self) -> tuple[str, str, str]:
        """(shape colour, shape, background colour)."""
        return self.colour, self.shape, self.background

    @property
    def caption(self) -> str:
        """The caption, e.g. "a red circle on a blue background"."""
        return caption(self.colour, self.shape, self.background)


def caption(colour: str, shape: str, background: str) -> str:
    """The caption of a combination, e.g. "a red circle on a blue background"."""
    return f"a {colour} {shape} on a {background} background"


def all_combos() -> list[tuple[str, str, str]]:
    """Every (shape colour, shape, background colour) with different colours, in a fixed order."""
    return [(c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, COLOURS) if c != b]


def trained_combos() -> list[tuple[str, str, str]]:
    """The combinations the model is trained on (all but HELD_OUT)."""
    return [combo for combo in all_combos() if combo not in HELD_OUT]


def random_scene(rng: random.Random, combos: list[tuple[str, str, str]]) -> Scene:
    """A scene of one of ``combos`` with a random position and size that keep the shape inside the picture."""
    colour, shape, background = rng.choice(combos)
    r = rng.randint(12, 22)
    margin = r + 3
    cx = rng.randint(margin, IMAGE_SIZE - 1 - margin)
    cy = rng.randint(margin, IMAGE_SIZE - 1 - margin)
    return Scene(colour, shape, background, cx, cy, r)


def draw(scene: Scene) -> Image.Image:
    """Render a scene as a 64x64 RGB picture."""
    if scene.shape not in SHAPES:
        raise ValueError(f"unknown shape {scene.shape!r}; choose one of {', '.join(SHAPES)}")
    for name in (scene.colour, scene.background):
        if name not in COLOURS:
            raise ValueError(f"unknown colour {name!r}; choose one of {', '.join(COLOURS)}")
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOURS[scene.background])
    pen = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    x, y, r = scene.cx, scene.cy, scene.r
    if scene.shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif scene.shape == "square":
        pen.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        pen.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    return image


def dataset(count: int, seed: int, combos: list[tuple[str, str, str]] | None = None
            ) -> tuple[np.ndarray, list[Scene]]:
    """``count`` seeded drawings as uint8 [N, 64, 64, 3] plus their scenes (default: the trained combinations)."""
    rng = random.Random(seed)
    pool = trained_combos() if combos is None else combos
    scenes = [random_scene(rng, pool) for _ in range(count)]
    return np.stack([np.asarray(draw(s)) for s in scenes]), scenes
