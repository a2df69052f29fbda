"""Named presets: one line per released model (its hub repository and family), each with a tiny, seeded twin."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from sdexport.demo import MODEL_DIR as DEMO_MODEL_DIR
from sdexport.specs.families import family
from sdexport.specs.ranges import ShapeRanges, native_ranges


@dataclass(frozen=True)
class Preset:
    """A named model: the hub repository it stands for, or a tiny random model built from embedded configs."""

    name: str
    hub_id: str | None
    tiny: bool
    default_ranges: ShapeRanges
    family: str
    folder: Path | None = None
    """A trained model shipped inside the package as a diffusers folder (the ``demo`` preset)."""

    def configs(self) -> dict[str, Any]:
        """The configs of this architecture: model_index, unet, vae, text encoders, scheduler."""
        if self.folder is not None:
            return _folder_configs(self.folder)
        return _load_configs(self.name)


@cache
def _load_configs(name: str) -> dict[str, Any]:
    text = resources.files("sdexport.specs").joinpath("data", f"{name}.json").read_text()
    return json.loads(text)


def _folder_configs(folder: Path) -> dict[str, Any]:
    configs = {"model_index": json.loads((folder / "model_index.json").read_text()),
               "scheduler": json.loads((folder / "scheduler" / "scheduler_config.json").read_text())}
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if (folder / part / "config.json").is_file():
            configs[part] = json.loads((folder / part / "config.json").read_text())
    return configs


TINY_RANGES = ShapeRanges(batch=(1, 1, 4), height=(32, 64, 256), width=(32, 64, 256))

# (preset, hub repository, family, tiny twin): the tiny twin's configs are data/<tiny twin>.json.
_RELEASED: tuple[tuple[str, str, str, str], ...] = (
    ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", "tiny-sd15"),
    ("sd15-inpaint", "stable-diffusion-v1-5/stable-diffusion-inpainting", "sd", "tiny-sd15-inpaint"),
    ("sd21", "stabilityai/stable-diffusion-2-1", "sd2", "tiny-sd2"),
    ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "tiny-sdxl"),
    ("sdxl-refiner", "stabilityai/stable-diffusion-xl-refiner-1.0", "sdxl-refiner", "tiny-sdxl-refiner"),
    ("sdxl-inpaint", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", "sdxl", "tiny-sdxl-inpaint"),
)

FAMILY_PRESETS: dict[str, Preset] = {
    name: Preset(name, hub_id, False, family(fam).default_ranges, fam) for name, hub_id, fam, _ in _RELEASED
}
TINY_PRESETS: dict[str, Preset] = {tiny: Preset(tiny, None, True, TINY_RANGES, fam) for _, _, fam, tiny in _RELEASED}
# Trained models shipped in the package: ``demo`` draws coloured shapes at 64x64 (docs/demo.md).
SHIPPED_PRESETS: dict[str, Preset] = {"demo": Preset("demo", None, False, TINY_RANGES, "sd", DEMO_MODEL_DIR)}
PRESETS: dict[str, Preset] = {**SHIPPED_PRESETS, **FAMILY_PRESETS, **TINY_PRESETS}


def resolve_preset(name: str) -> Preset | None:
    """The preset called ``name``, or None when ``name`` is not a preset (a hub id or a folder)."""
    return PRESETS.get(name)


def source_ranges(preset: Preset | None, family_name: str, configs: Mapping[str, Any],
                  given: Mapping[str, Any] | None = None) -> tuple[ShapeRanges, str]:
    """The shape ranges of a build and why: ``given`` fields over the preset's documented ranges, or over ranges
    from the model's own configs (hub ids and folders, ``native_ranges``)."""
    if preset is not None:
        base, why = preset.default_ranges, f"the {preset.name} preset's documented ranges"
    else:
        base, why = native_ranges(configs["unet"], configs["vae"], family(family_name).default_ranges)
    given = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = sorted(set(given) - {"batch", "height", "width", "prompt_chunks"})
    if unknown:
        raise ValueError(f"shape range(s) {unknown} unknown; give batch, height, width or prompt_chunks")
    if not given:
        return base, why
    ranges = replace(base, **{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in given.items()})
    rest = [k for k in ("batch", "height", "width", "prompt_chunks") if k not in given]
    return ranges, f"given: {', '.join(given)}" + (f"; {', '.join(rest)} {why}" if rest else "")


def default_ranges_for(family_name: str, tiny: bool) -> ShapeRanges:
    """Default shape ranges for a family when the source is not a preset."""
    return TINY_RANGES if tiny else family(family_name).default_ranges
