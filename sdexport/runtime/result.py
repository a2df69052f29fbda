"""What a generation returns (images, timings, seeds) and the errors the runtime raises while generating."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdexport.errors import SdexportError


class RequestError(SdexportError, ValueError):
    """A generation argument is invalid or outside what the folder was built for; the message names it."""


class GenerationCancelled(SdexportError):
    """The step callback returned False. ``partial`` holds the result up to that step (latents, timings, seeds)."""

    def __init__(self, step: int, num_steps: int, partial: GenerationResult) -> None:
        super().__init__(f"generation cancelled by the callback after step {step + 1} of {num_steps}")
        self.step = step
        self.num_steps = num_steps
        self.partial = partial


class NonFiniteError(SdexportError):
    """A network produced NaN or Inf; raised instead of returning a black or noisy image."""

    def __init__(self, stage: str, step: int | None = None) -> None:
        where = f"{stage} at step {step + 1}" if step is not None else stage
        super().__init__(
            f"{where} produced NaN or Inf values. Common causes: an fp16 engine overflowing (rebuild that component "
            f"with --component-precision {stage}=fp32), an extreme guidance_scale, or corrupted inputs"
        )
        self.stage = stage
        self.step = step


StepCallback = Callable[[int, int, float, Any], "bool | None"]
"""``callback(step_index, num_steps, timestep, latents)`` after every model evaluation; ``latents`` is the current
float32 [N, 4, h, w] array (do not modify it): numpy, or a CuPy array when the loop runs on the GPU
(``pipe.arrays.get(latents)`` copies it to the host). Return False to cancel: the call raises GenerationCancelled,
whose ``partial`` has the latents so far (numpy). Any other return value continues."""


@dataclass
class Timings:
    """Seconds per stage. ``unet`` is the engine time of each model evaluation, ``steps`` the time of each (engine +
    scheduler + guidance, not the callback), so ``steps[i] - unet[i]`` is the runtime's own overhead. When the loop
    runs on a GPU both are measured with CUDA events on the engines' stream: time on the GPU, without waiting."""

    text_encoder: float = 0.0
    vae_encoder: float = 0.0
    unet: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    vae_decoder: float = 0.0
    total: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"text_encoder": self.text_encoder, "vae_encoder": self.vae_encoder, "unet": list(self.unet),
                "steps": list(self.steps), "vae_decoder": self.vae_decoder, "total": self.total}


@dataclass
class GenerationResult:
    """``images``: PIL images, uint8 / float arrays or latents (see ``output_type``); one seed per image."""

    images: Any = field(repr=False)
    seeds: list[int]
    timings: Timings
    output_type: str
    parameters: dict[str, Any]
    latent_space: tuple[float, int, int]
    """(scaling_factor, vae_scale_factor, latent channels) of the folder that made it: latents hand over only
    between folders with the same latent space (SDXL base -> refiner, not SD 1.5 -> SDXL)."""
