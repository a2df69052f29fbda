"""SDXL base -> refiner parity: diffusers' denoising_end / denoising_start split, latents handed over directly."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from fakes.parity import IMAGE_ATOL, LATENT_ATOL
from sdexport.export.parity import diffusers_pipeline, torch_generators


@pytest.mark.parametrize("scheduler", [None, "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"])
def test_base_to_refiner_split_matches_diffusers(tiny_source: Any, tiny_pipe: Any, parity_table: list[Any],
                                                 scheduler: str | None) -> None:
    base, refiner = tiny_pipe("tiny-sdxl"), tiny_pipe("tiny-sdxl-refiner")
    ref_base = diffusers_pipeline(tiny_source("tiny-sdxl").pipe, base.spec, "txt2img", scheduler)
    ref_refiner = diffusers_pipeline(tiny_source("tiny-sdxl-refiner").pipe, refiner.spec, "img2img", scheduler)
    prompts, seeds, split = ["a lighthouse", "a harbour"], [21, 22], 0.7
    common = dict(prompt=prompts, num_inference_steps=6, height=72, width=56)

    ref_latents = ref_base(**common, denoising_end=split, generator=torch_generators(seeds),
                           output_type="latent").images
    ours_latents = base(**common, denoising_end=split, seed=seeds, rng="torch", output_type="latent",
                        scheduler=scheduler)
    assert np.abs(ours_latents.images - ref_latents.numpy()).max() <= LATENT_ATOL

    ref_steps: list[np.ndarray] = []

    def keep(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        ref_steps.append(tensors["latents"].numpy().copy())
        return tensors

    ref = ref_refiner(prompt=prompts, image=ref_latents, num_inference_steps=6, denoising_start=split,
                      generator=torch_generators(seeds), output_type="np", callback_on_step_end=keep).images
    our_steps: list[np.ndarray] = []
    ours = refiner(prompt=prompts, image=ours_latents, num_inference_steps=6, denoising_start=split, seed=seeds,
                   rng="torch", output_type="np_float", scheduler=scheduler,
                   callback=lambda i, n, t, lat: our_steps.append(lat.copy()))
    # The refiner runs exactly diffusers' tail of the schedule (model evaluations), and ends on the same latents.
    assert len(our_steps) == len(ref_steps)
    latent_diff, image_diff = np.abs(our_steps[-1] - ref_steps[-1]).max(), np.abs(ours.images - ref).max()
    parity_table.append((f"base -> refiner {scheduler or 'EulerDiscreteScheduler'}", latent_diff, image_diff))
    assert latent_diff <= LATENT_ATOL
    assert image_diff <= IMAGE_ATOL


def test_refiner_img2img_from_picture_matches_diffusers(parity_run: Any, picture: Image.Image) -> None:
    # The refiner's own time ids carry aesthetic scores (requires_aesthetics_score in its model_index).
    run = parity_run("tiny-sdxl-refiner", "img2img", seeds=[9], prompt="a cat", image=picture.resize((56, 72)),
                     strength=0.5, num_inference_steps=6, aesthetic_score=7.0, negative_aesthetic_score=2.0)
    assert run.latent_diff <= LATENT_ATOL, f"final latents differ by {run.latent_diff:.3g}"
    assert run.image_diff <= IMAGE_ATOL, f"images differ by {run.image_diff * 255:.3g}/255"

