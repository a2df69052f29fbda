"""One engine batch through the Pipeline: prompts, per-image seeds and pictures in, encoded PNGs out."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sdexport.runtime.result import NonFiniteError, RequestError
from sdexport.synth.plan import Batch, Item

GENERATION_ERRORS = (RequestError, NonFiniteError, OSError, ValueError)
"""What a failed batch raises: reported per row in errors.jsonl (or stops a --fail-fast run)."""

IMAGE_ROLES = ("image", "original", "mask")
"""The pictures of a sample: the result, and for inpainting the original and the mask at the generated size."""


@dataclass(frozen=True)
class Sample:
    """One generated sample: its item, pictures per role, and the parameters the Pipeline resolved."""

    item: Item
    pictures: dict[str, Image.Image]
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Output:
    """A sample ready to store: its item, PNG bytes per role, and the parameters the Pipeline resolved."""

    item: Item
    files: dict[str, bytes]
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Failure:
    """A batch whose generation failed: the rows it held and why."""

    rows: tuple[tuple[int, str], ...]
    message: str

    @classmethod
    def of(cls, batch: Batch, error: BaseException) -> Failure:
        """The failure of ``batch`` with ``error``."""
        rows = tuple(dict.fromkeys((item.job.row, item.job.id) for item in batch.items))
        return cls(rows, f"generation failed: {error}")


def encode_png(picture: Image.Image) -> bytes:
    """PNG bytes of a picture (deterministic: same pixels, same bytes)."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def encode(sample: Sample) -> Output:
    """Encode a sample's pictures as PNG (run on the writer thread, so it overlaps the next batch's generation)."""
    return Output(sample.item, {role: encode_png(p) for role, p in sample.pictures.items()}, sample.parameters)


def _open(path: str, mode: str) -> Image.Image:
    with Image.open(path) as picture:
        return picture.convert(mode)


def _call_args(batch: Batch) -> dict[str, Any]:
    """Pipeline arguments of a batch: one prompt, seed and picture per item; shared size, steps and guidance."""
    items = batch.items
    first = items[0].job
    negatives = [item.job.negative_prompt for item in items]
    args: dict[str, Any] = {
        "prompt": [item.job.prompt for item in items],
        "negative_prompt": None if first.negative_prompt is None else negatives,
        "seed": [item.seed for item in items], "height": first.height, "width": first.width,
        "num_inference_steps": first.steps, "guidance_scale": first.guidance_scale, "scheduler": first.scheduler,
        "output_type": "pil",
    }
    if first.task != "txt2img":
        args["image"] = [_open(item.job.image, "RGB") for item in items]
    if first.task == "inpaint":
        args["mask_image"] = [_open(item.job.mask, "L") for item in items]
    return args


def run_batch(pipe: Any, batch: Batch) -> list[Sample]:
    """Generate one batch with ``pipe`` (a Pipeline); each image gets exactly the pixels of its own seed."""
    args = _call_args(batch)
    result = pipe(**args)
    parameters = {"guidance_scale": result.parameters["guidance_scale"], "scheduler": result.parameters["scheduler"]}
    if "strength" in result.parameters:
        parameters["strength"] = result.parameters["strength"]
    size = (batch.items[0].job.width, batch.items[0].job.height)
    outputs = []
    for number, (item, picture) in enumerate(zip(batch.items, result.images, strict=True)):
        pictures = {"image": picture}
        if item.job.task == "inpaint":
            pictures["original"] = args["image"][number].resize(size, Image.Resampling.LANCZOS)
            pictures["mask"] = args["mask_image"][number].resize(size, Image.Resampling.LANCZOS)
        outputs.append(Sample(item, pictures, parameters))
    return outputs
