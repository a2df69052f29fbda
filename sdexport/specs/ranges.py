"""Shape ranges: what a compiled folder accepts (images per call, pixel size, prompt chunks) and their profiles."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdexport.specs.model import ComponentSpec

TOKENS_PER_CHUNK = 77

Range = tuple[int, int, int]


MAX_SPAN = 8
"""A pixel range's max may be at most MAX_SPAN x its min: builds validate near the smallest sizes (the traced
shapes), so a folder claims no size far beyond what its validation covered."""
BAND = (0.5, 2.0)
"""The default pixel range of a model that is not a preset: this band around its native size."""


def _check_range(label: str, value: Range, multiple: int = 1, span: int | None = None) -> None:
    if len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{label} range {value!r} must be three integers (min, opt, max)")
    lo, opt, hi = value
    if not (1 <= lo <= opt <= hi):
        raise ValueError(f"{label} range {value} must satisfy 1 <= min <= opt <= max")
    bad = [v for v in value if v % multiple]
    if bad:
        raise ValueError(f"{label} range {value}: {bad} not a multiple of {multiple}")
    if span is not None and hi > span * lo:
        raise ValueError(f"{label} range {value}: max {hi} is over {span} x the min {lo}, the largest size a build "
                         f"validates for ({span * lo}); pass a max of at most {span * lo} or a larger min")


@dataclass(frozen=True)
class ShapeRanges:
    """What a compiled folder accepts: images per call, pixel height / width, prompt chunks of 77 tokens."""

    batch: Range = (1, 1, 4)
    height: Range = (256, 512, 1024)
    width: Range = (256, 512, 1024)
    prompt_chunks: int = 3

    def validate(self, pixel_multiple: int) -> None:
        """Raise ValueError naming the first range that is empty or off the pixel grid."""
        _check_range("batch", self.batch)
        _check_range("height", self.height, pixel_multiple, MAX_SPAN)
        _check_range("width", self.width, pixel_multiple, MAX_SPAN)
        if isinstance(self.prompt_chunks, bool) or not isinstance(self.prompt_chunks, int) or self.prompt_chunks < 1:
            raise ValueError(f"prompt_chunks={self.prompt_chunks!r} must be an integer >= 1 (chunks of 77 tokens)")

    def symbol_ranges(self, component: ComponentSpec, vae_scale_factor: int) -> dict[str, Range]:
        """min/opt/max of every symbolic dim of ``component``."""
        b_lo, b_opt, b_hi = self.batch
        if component.cfg_batched:
            # Guidance off runs batch B; guidance on runs 2B in one call. Text encoders also take every chunk.
            chunks = self.prompt_chunks if component.name.startswith("text_encoder") else 1
            batch = (b_lo, 2 * b_opt, 2 * b_hi * chunks)
        else:
            batch = self.batch
        f = vae_scale_factor
        values: dict[str, Range] = {
            "batch": batch,
            "image_height": self.height,
            "image_width": self.width,
            "latent_height": (self.height[0] // f, self.height[1] // f, self.height[2] // f),
            "latent_width": (self.width[0] // f, self.width[1] // f, self.width[2] // f),
            "sequence": (TOKENS_PER_CHUNK, TOKENS_PER_CHUNK, TOKENS_PER_CHUNK * self.prompt_chunks),
        }
        return {s: values[s] for s in component.symbols()}

    def profile(self, component: ComponentSpec, vae_scale_factor: int) -> dict[str, dict[str, list[int]]]:
        """Input name -> {"min","opt","max"} shapes: the engine optimisation profile and the runtime check."""
        ranges = self.symbol_ranges(component, vae_scale_factor)
        out: dict[str, dict[str, list[int]]] = {}
        for tensor in component.inputs:
            out[tensor.name] = {
                key: list(tensor.shape({s: r[i] for s, r in ranges.items()}))
                for i, key in enumerate(("min", "opt", "max"))
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON form used in the manifest."""
        return {
            "batch": list(self.batch),
            "height": list(self.height),
            "width": list(self.width),
            "prompt_chunks": self.prompt_chunks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeRanges:
        """Inverse of ``to_dict``."""
        return cls(
            batch=tuple(data["batch"]),
            height=tuple(data["height"]),
            width=tuple(data["width"]),
            prompt_chunks=int(data["prompt_chunks"]),
        )


def _round_to(value: float, multiple: int, up: bool) -> int:
    steps = value / multiple
    return multiple * int(math.ceil(steps) if up else math.floor(steps))


def native_ranges(unet_config: Mapping[str, Any], vae_config: Mapping[str, Any],
                  base: ShapeRanges | None = None) -> tuple[ShapeRanges, str]:
    """Default ranges from a model's own configs, and why: BAND around the native size, on the latent grid.

    The native size is ``unet.sample_size * vae_scale_factor`` (vae_scale_factor = 2 ** (VAE blocks - 1)), as
    diffusers' pipelines default to; sizes are multiples of the VAE factor times the UNet's downsampling
    (2 ** (down blocks - 1)), so latents need no padding. Batch and prompt chunks come from ``base``.
    """
    base = base or ShapeRanges()
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    down = 2 ** (len(unet_config["down_block_types"]) - 1)
    align = factor * down
    sample = unet_config.get("sample_size")
    sides = list(sample) if isinstance(sample, list | tuple) else [sample, sample]
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise ValueError(f"unet config sample_size={sample!r}: expected a positive integer (or [height, width])")
    out = []
    for side in sides:
        native = side * factor
        lo = max(align, _round_to(native * BAND[0], align, up=True))
        hi = max(lo, _round_to(native * BAND[1], align, up=False))
        out.append((lo, min(max(_round_to(native, align, up=False), lo), hi), hi))
    shown = sides[0] if sides[0] == sides[1] else f"{sides[0]}x{sides[1]}"
    why = (f"from unet.sample_size {shown} x vae scale {factor} = {sides[0] * factor} px native, {BAND[0]:g}x-"
           f"{BAND[1]:g}x in multiples of {align} px (vae scale {factor} x the UNet's {down}x downsampling)")
    return ShapeRanges(batch=base.batch, height=out[0], width=out[1], prompt_chunks=base.prompt_chunks), why
