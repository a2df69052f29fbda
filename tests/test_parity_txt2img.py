"""Text-to-image parity with diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline (same weights, noise)."""

from __future__ import annotations

from typing import Any

import pytest

from fakes.parity import IMAGE_ATOL, LATENT_ATOL

CASES: list[tuple[str, str, dict[str, Any]]] = [
    # (id, preset, arguments for both sides); 72x56 is non-square, 2 prompts x 2 images is a batch of 4.
    ("sd-cfg-batch", "tiny-sd15", dict(prompt=["a red circle", "a blue square"], num_images_per_prompt=2,
                                       height=72, width=56, num_inference_steps=4)),
    ("sd-no-cfg", "tiny-sd15", dict(prompt="a red circle", guidance_scale=1.0, num_inference_steps=4)),
    ("sd-rescale", "tiny-sd15", dict(prompt="a red circle", guidance_rescale=0.7, num_inference_steps=4)),
    ("sd-clip-skip", "tiny-sd15", dict(prompt=["a red circle"], negative_prompt=["blurry"], clip_skip=2,
                                       num_inference_steps=4)),
    ("sd-ddim-eta", "tiny-sd15", dict(prompt="a red circle", num_inference_steps=4, eta=0.6,
                                      scheduler="DDIMScheduler")),
    ("sd-dpmpp-2m", "tiny-sd15", dict(prompt="a red circle", num_inference_steps=5,
                                      scheduler="DPMSolverMultistepScheduler")),
    ("xl-cfg-batch", "tiny-sdxl", dict(prompt=["a red circle", "a blue square"], num_images_per_prompt=2,
                                       height=72, width=56, num_inference_steps=4)),
    ("xl-no-cfg", "tiny-sdxl", dict(prompt="a red circle", guidance_scale=1.0, num_inference_steps=4)),
    ("xl-rescale-negative", "tiny-sdxl", dict(prompt="a red circle", negative_prompt="blurry", guidance_rescale=0.5,
                                              num_inference_steps=4)),
    ("xl-clip-skip-prompt2", "tiny-sdxl", dict(prompt="a red circle", prompt_2="oil painting", clip_skip=1,
                                               num_inference_steps=4)),
    ("xl-time-ids", "tiny-sdxl", dict(prompt="a red circle", original_size=(128, 96), target_size=(64, 48),
                                      crops_coords_top_left=(8, 4), num_inference_steps=4)),
    ("xl-negative-sizes", "tiny-sdxl", dict(prompt="a red circle", negative_prompt="blurry",
                                            negative_original_size=(32, 32), negative_target_size=(128, 128),
                                            num_inference_steps=4)),
    ("xl-euler-ancestral", "tiny-sdxl", dict(prompt="a red circle", num_inference_steps=4,
                                             scheduler="EulerAncestralDiscreteScheduler")),
    ("xl-heun", "tiny-sdxl", dict(prompt="a red circle", num_inference_steps=4, scheduler="HeunDiscreteScheduler")),
    ("xl-dpmpp-sde", "tiny-sdxl", dict(prompt="a red circle", num_inference_steps=5,
                                       scheduler="DPMSolverMultistepScheduler",
                                       scheduler_config={"algorithm_type": "sde-dpmsolver++"})),
    ("xl-unipc", "tiny-sdxl", dict(prompt="a red circle", num_inference_steps=5,
                                   scheduler="UniPCMultistepScheduler")),
]


@pytest.mark.parametrize(("preset", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_txt2img_matches_diffusers(parity_run: Any, preset: str, kwargs: dict[str, Any]) -> None:
    count = (len(kwargs["prompt"]) if isinstance(kwargs["prompt"], list) else 1) * kwargs.get(
        "num_images_per_prompt", 1)
    run = parity_run(preset, "txt2img", seeds=list(range(11, 11 + count)), **kwargs)
    assert run.latents.shape == run.ref_latents.shape
    print(f"latents {run.latent_diff:.2e} images {run.image_diff * 255:.3f}/255")
    assert run.latent_diff <= LATENT_ATOL, f"final latents differ by {run.latent_diff:.3g}"
    assert run.image_diff <= IMAGE_ATOL, f"images differ by {run.image_diff * 255:.3g}/255"
