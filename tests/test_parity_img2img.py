"""Image-to-image and inpainting parity with diffusers' Img2Img / Inpaint pipelines (SD 1.5 and SDXL)."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from fakes.parity import IMAGE_ATOL, LATENT_ATOL

IMG2IMG: list[tuple[str, str, dict[str, Any]]] = [
    ("sd-pndm", "tiny-sd15", dict(strength=0.6, num_inference_steps=5)),
    ("sd-euler-ancestral-batch", "tiny-sd15", dict(strength=0.75, num_inference_steps=4, num_images_per_prompt=2,
                                                   scheduler="EulerAncestralDiscreteScheduler")),
    ("xl-euler", "tiny-sdxl", dict(strength=0.5, num_inference_steps=6)),
    ("xl-no-cfg-heun", "tiny-sdxl", dict(strength=0.7, num_inference_steps=4, guidance_scale=1.0,
                                         scheduler="HeunDiscreteScheduler")),
]

INPAINT: list[tuple[str, str, dict[str, Any]]] = [
    # 4-channel UNets blend the re-noised original outside the mask; 9-channel UNets take mask + masked latents.
    ("sd-blend-full", "tiny-sd15", dict(strength=1.0, num_inference_steps=4)),
    ("sd-blend-partial-ancestral", "tiny-sd15", dict(strength=0.7, num_inference_steps=5,
                                                     scheduler="EulerAncestralDiscreteScheduler")),
    ("sd-9ch-full", "tiny-sd15-inpaint", dict(strength=1.0, num_inference_steps=4)),
    ("sd-9ch-partial-ddim-eta", "tiny-sd15-inpaint", dict(strength=0.75, num_inference_steps=4, eta=0.5,
                                                          scheduler="DDIMScheduler")),
    ("xl-blend", "tiny-sdxl", dict(strength=0.8, num_inference_steps=5)),
    ("xl-9ch-default-strength", "tiny-sdxl-inpaint", dict(num_inference_steps=4, guidance_rescale=0.3)),
    ("xl-9ch-full-ancestral", "tiny-sdxl-inpaint", dict(strength=1.0, num_inference_steps=4,
                                                        scheduler="EulerAncestralDiscreteScheduler")),
]


def _check(run: Any) -> None:
    assert run.latents.shape == run.ref_latents.shape
    assert run.latent_diff <= LATENT_ATOL, f"final latents differ by {run.latent_diff:.3g}"
    assert run.image_diff <= IMAGE_ATOL, f"images differ by {run.image_diff * 255:.3g}/255"


@pytest.mark.parametrize(("preset", "kwargs"), [c[1:] for c in IMG2IMG], ids=[c[0] for c in IMG2IMG])
def test_img2img_matches_diffusers(parity_run: Any, picture: Image.Image, preset: str, kwargs: dict[str, Any]) -> None:
    # diffusers' img2img has no height/width: it generates at the picture's size, so resize it first (72x56).
    count = kwargs.get("num_images_per_prompt", 1)
    run = parity_run(preset, "img2img", seeds=list(range(3, 3 + count)), prompt="a cat",
                     image=picture.resize((56, 72)), **kwargs)
    _check(run)


@pytest.mark.parametrize(("preset", "kwargs"), [c[1:] for c in INPAINT], ids=[c[0] for c in INPAINT])
def test_inpaint_matches_diffusers(parity_run: Any, picture: Image.Image, mask: Image.Image, preset: str,
                                   kwargs: dict[str, Any]) -> None:
    # The 80x64 picture is resized to 72x56 (Lanczos) on both sides; the mask is binarised at 0.5.
    run = parity_run(preset, "inpaint", seeds=[5], prompt="a cat", image=picture, mask_image=mask, height=72,
                     width=56, **kwargs)
    _check(run)
