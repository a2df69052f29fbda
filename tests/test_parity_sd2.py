"""SD 2.x parity with diffusers' StableDiffusion[Img2Img]Pipeline: OpenCLIP-style encoder, v-prediction, "!" pads."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from fakes.parity import IMAGE_ATOL, LATENT_ATOL

TXT2IMG: list[tuple[str, dict[str, Any]]] = [
    # tiny-sd2 ships SD 2.1's scheduler: DDIM with prediction_type v_prediction.
    ("cfg-batch-ddim-v", dict(prompt=["a red circle", "a blue square"], num_images_per_prompt=2, height=72, width=56,
                              num_inference_steps=4)),
    ("no-cfg", dict(prompt="a red circle", guidance_scale=1.0, num_inference_steps=4)),
    ("negative-clip-skip", dict(prompt="a red circle", negative_prompt="blurry", clip_skip=1,
                                num_inference_steps=4)),
    ("rescale-euler-v", dict(prompt="a red circle", guidance_rescale=0.7, num_inference_steps=4,
                             scheduler="EulerDiscreteScheduler")),
    ("dpmpp-2m-v", dict(prompt="a red circle", num_inference_steps=5, scheduler="DPMSolverMultistepScheduler")),
]


def _check(run: Any) -> None:
    assert run.latents.shape == run.ref_latents.shape
    assert run.latent_diff <= LATENT_ATOL, f"final latents differ by {run.latent_diff:.3g}"
    assert run.image_diff <= IMAGE_ATOL, f"images differ by {run.image_diff * 255:.3g}/255"


@pytest.mark.parametrize("kwargs", [c[1] for c in TXT2IMG], ids=[c[0] for c in TXT2IMG])
def test_sd2_txt2img_matches_diffusers(parity_run: Any, kwargs: dict[str, Any]) -> None:
    count = (len(kwargs["prompt"]) if isinstance(kwargs["prompt"], list) else 1) * kwargs.get(
        "num_images_per_prompt", 1)
    _check(parity_run("tiny-sd2", "txt2img", seeds=list(range(21, 21 + count)), **kwargs))


@pytest.mark.parametrize("kwargs", [dict(strength=0.6, num_inference_steps=5),
                                    dict(strength=0.8, num_inference_steps=4, num_images_per_prompt=2,
                                         scheduler="EulerAncestralDiscreteScheduler")],
                         ids=["ddim-v", "euler-ancestral-v-batch"])
def test_sd2_img2img_matches_diffusers(parity_run: Any, picture: Image.Image, kwargs: dict[str, Any]) -> None:
    # diffusers' img2img generates at the picture's size: resize it to 72x56 first, as in test_parity_img2img.
    count = kwargs.get("num_images_per_prompt", 1)
    _check(parity_run("tiny-sd2", "img2img", seeds=list(range(3, 3 + count)), prompt="a cat",
                      image=picture.resize((56, 72)), **kwargs))


def test_sd2_source_is_v_prediction_with_openclip_padding(tiny_source: Any, tiny_pipe: Any) -> None:
    source = tiny_source("tiny-sd2")
    assert source.spec.family == "sd2"
    assert source.pipe.scheduler.config.prediction_type == "v_prediction"
    assert source.pipe.unet.config.upcast_attention and source.pipe.unet.config.use_linear_projection
    assert source.pipe.tokenizer.pad_token == "!"
    # The runtime's tokenizer pads the same way: "!" after the end token, not another end token.
    ids = tiny_pipe("tiny-sd2").tokenizers["tokenizer"](["a cat"], None).ids[0]
    assert ids[-1] == source.pipe.tokenizer.convert_tokens_to_ids("!") != source.pipe.tokenizer.eos_token_id
