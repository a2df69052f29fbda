"""Named presets: the five family presets (canonical hub repositories) and their tiny, seeded counterparts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from sdexport.specs.model import ShapeRanges


@dataclass(frozen=True)
class Preset:
    """A named model: the hub repository it stands for, or a tiny random model built from embedded configs."""

    name: str
    hub_id: str | None
    tiny: bool
    default_ranges: ShapeRanges

    def configs(self) -> dict[str, Any]:
        """The embedded configs of this architecture: model_index, unet, vae, text encoders, scheduler."""
        return _load_configs(self.name)


@cache
def _load_configs(name: str) -> dict[str, Any]:
    text = resources.files("sdexport.specs").joinpath("data", f"{name}.json").read_text()
    return json.loads(text)


_SD_RANGES = ShapeRanges(batch=(1, 1, 4), height=(256, 512, 1024), width=(256, 512, 1024))
_SDXL_RANGES = ShapeRanges(batch=(1, 1, 4), height=(512, 1024, 1536), width=(512, 1024, 1536))
TINY_RANGES = ShapeRanges(batch=(1, 1, 4), height=(32, 64, 256), width=(32, 64, 256))

FAMILY_PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", False, _SD_RANGES),
        Preset("sd15-inpaint", "stable-diffusion-v1-5/stable-diffusion-inpainting", False, _SD_RANGES),
        Preset("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", False, _SDXL_RANGES),
        Preset("sdxl-refiner", "stabilityai/stable-diffusion-xl-refiner-1.0", False, _SDXL_RANGES),
        Preset("sdxl-inpaint", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", False, _SDXL_RANGES),
    )
}
TINY_PRESETS: dict[str, Preset] = {
    f"tiny-{name}": Preset(f"tiny-{name}", None, True, TINY_RANGES) for name in FAMILY_PRESETS
}
PRESETS: dict[str, Preset] = {**FAMILY_PRESETS, **TINY_PRESETS}


def resolve_preset(name: str) -> Preset | None:
    """The preset called ``name``, or None when ``name`` is not a preset (a hub id or a folder)."""
    return PRESETS.get(name)


def default_ranges_for(family: str, tiny: bool) -> ShapeRanges:
    """Default shape ranges for a family when the source is not a preset."""
    if tiny:
        return TINY_RANGES
    return _SD_RANGES if family == "sd" else _SDXL_RANGES
