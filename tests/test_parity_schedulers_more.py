"""Text-to-image parity with diffusers' pipelines for the schedulers added after the first set (tiny presets)."""

from __future__ import annotations

from typing import Any

import pytest

from fakes.parity import IMAGE_ATOL, LATENT_ATOL

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("sd-euler-beta", "tiny-sd15", dict(prompt="a red circle", num_inference_steps=5,
                                        scheduler="EulerDiscreteScheduler",
                                        scheduler_config={"use_beta_sigmas": True})),
    ("sd-dpm2", "tiny-sd15", dict(prompt="a red circle", num_inference_steps=4, scheduler="KDPM2DiscreteScheduler")),
    ("xl-dpm2-a-karras", "tiny-sdxl", dict(prompt="a red circle", num_inference_steps=4,
                                           scheduler="KDPM2AncestralDiscreteScheduler",
                                           scheduler_config={"use_karras_sigmas": True})),
    ("sd-dpmpp-2s-karras", "tiny-sd15", dict(prompt="a red circle", num_inference_steps=6,
                                             scheduler="DPMSolverSinglestepScheduler",
                                             scheduler_config={"use_karras_sigmas": True})),
    ("xl-dpmpp-3s-sde", "tiny-sdxl", dict(prompt="a red circle", num_inference_steps=6,
                                          scheduler="DPMSolverSinglestepScheduler",
                                          scheduler_config={"solver_order": 3, "algorithm_type": "sde-dpmsolver++"})),
    ("sd-deis", "tiny-sd15", dict(prompt="a red circle", num_inference_steps=5,
                                  scheduler="DEISMultistepScheduler")),
    ("xl-edm-euler", "tiny-sdxl", dict(prompt="a red circle", num_inference_steps=4,
                                       scheduler="EDMEulerScheduler")),
    ("sd-edm-dpmpp-2m-v", "tiny-sd15", dict(prompt="a red circle", num_inference_steps=5,
                                            scheduler="EDMDPMSolverMultistepScheduler",
                                            scheduler_config={"prediction_type": "v_prediction"})),
    ("sd-tcd-gamma", "tiny-sd15", dict(prompt="a red circle", num_inference_steps=4, eta=0.3,
                                       scheduler="TCDScheduler")),
    ("xl-sa-solver", "tiny-sdxl", dict(prompt="a red circle", num_inference_steps=5,
                                       scheduler="SASolverScheduler")),
]


@pytest.mark.parametrize(("preset", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_txt2img_matches_diffusers(parity_run: Any, preset: str, kwargs: dict[str, Any]) -> None:
    run = parity_run(preset, "txt2img", seeds=[11], **kwargs)
    assert run.latents.shape == run.ref_latents.shape
    assert run.latent_diff <= LATENT_ATOL, f"final latents differ by {run.latent_diff:.3g}"
    assert run.image_diff <= IMAGE_ATOL, f"images differ by {run.image_diff * 255:.3g}/255"
