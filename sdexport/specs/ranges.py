"""Shape ranges: what a compiled folder accepts (images per call, pixel size, prompt chunks) and their profiles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdexport.specs.model import ComponentSpec

TOKENS_PER_CHUNK = 77

Range = tuple[int, int, int]


def _check_range(label: str, value: Range, multiple: int = 1) -> None:
    lo, opt, hi = value
    if not (1 <= lo <= opt <= hi):
        raise ValueError(f"{label} range {value} must satisfy 1 <= min <= opt <= max")
    bad = [v for v in value if v % multiple]
    if bad:
        raise ValueError(f"{label} range {value}: {bad} not a multiple of {multiple}")


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
        _check_range("height", self.height, pixel_multiple)
        _check_range("width", self.width, pixel_multiple)
        if self.prompt_chunks < 1:
            raise ValueError(f"prompt_chunks={self.prompt_chunks} must be >= 1")

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
