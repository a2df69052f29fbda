"""Every invalid request is refused before any engine runs, with a message naming the value and what is allowed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdexport.runtime.pipeline import Pipeline
from sdexport.runtime.result import RequestError


class CountingEngine:
    """Wraps an engine and counts its runs."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.name, self.inputs, self.outputs = engine, engine.name, engine.inputs, engine.outputs
        self.runs = 0

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        self.runs += 1
        return self.engine.run(feeds)


def _counted(pipe: Pipeline) -> tuple[Pipeline, dict[str, CountingEngine]]:
    engines = {name: CountingEngine(engine) for name, engine in pipe.engines.items()}
    return Pipeline(pipe.folder, pipe.manifest, dict(engines)), engines


@pytest.fixture(scope="module")
def counted(tiny_pipe: Callable[[str], Pipeline]) -> Callable[[str], tuple[Pipeline, dict[str, CountingEngine]]]:
    cache: dict[str, tuple[Pipeline, dict[str, CountingEngine]]] = {}

    def get(preset: str) -> tuple[Pipeline, dict[str, CountingEngine]]:
        if preset not in cache:
            cache[preset] = _counted(tiny_pipe(preset))
        return cache[preset]

    return get


PICTURE = Image.new("RGB", (64, 64), (120, 30, 200))
MASK = Image.new("L", (64, 64), 255)

CASES: list[tuple[str, str, dict[str, Any], str]] = [
    # (id, preset, arguments, a regular expression the message must match)
    ("height-off-grid", "tiny-sd15", dict(height=60), r"height=60 .*32\.\.256 px in multiples of 8"),
    ("height-too-big", "tiny-sd15", dict(height=512), r"height=512 .*build range \(32, 64, 256\)"),
    ("width-too-small", "tiny-sdxl", dict(width=16), r"width=16 .*32\.\.256"),
    ("zero-steps", "tiny-sd15", dict(num_inference_steps=0), r"num_inference_steps=0 .*1\.\."),
    ("too-many-steps", "tiny-sd15", dict(num_inference_steps=1001), r"num_inference_steps=1001"),
    ("steps-past-last-timestep", "tiny-sd15", dict(num_inference_steps=1000, scheduler="pndm"),
     r"num_inference_steps=1000 gives timestep 1000, past the last training timestep 999"),
    ("strength-zero", "tiny-sd15", dict(image=PICTURE, strength=0.0), r"strength=0\.0 .*0\.0 < strength <= 1\.0"),
    ("strength-above-one", "tiny-sdxl", dict(image=PICTURE, strength=1.5), r"strength=1\.5"),
    ("strength-without-image", "tiny-sd15", dict(strength=0.5), r"strength applies to image-to-image"),
    ("start-after-end", "tiny-sdxl", dict(image=PICTURE, denoising_start=0.8, denoising_end=0.5),
     r"denoising_start=0\.8 must be smaller than denoising_end=0\.5"),
    ("start-without-image", "tiny-sdxl", dict(denoising_start=0.5), r"denoising_start applies"),
    ("end-out-of-range", "tiny-sdxl", dict(denoising_end=1.0), r"denoising_end=1\.0 .*0\.0 < denoising_end < 1\.0"),
    ("refiner-without-image", "tiny-sdxl-refiner", {}, r"refiner folder refines images"),
    ("inpaint-folder-without-mask", "tiny-sd15-inpaint", dict(image=PICTURE), r"inpainting folder"),
    ("mask-without-image", "tiny-sd15", dict(mask_image=MASK), r"mask_image needs an image"),
    ("batch-too-big", "tiny-sd15", dict(prompt=["a", "b", "c"], num_images_per_prompt=2),
     r"= 6 images; .*1\.\.4 images per call \(batch range \(1, 1, 4\)\)"),
    ("clip-skip-too-big", "tiny-sdxl", dict(clip_skip=5), r"clip_skip=5 .*0\.\.4"),
    ("output-type", "tiny-sd15", dict(output_type="jpeg"), r"output_type='jpeg' is not one of"),
    ("prompt-2-on-sd", "tiny-sd15", dict(prompt_2="x"), r"prompt_2 feed SDXL's second text encoder"),
    ("latents-shape", "tiny-sd15", dict(latents=np.zeros((1, 4, 4, 4), np.float32)), r"latents have shape"),
    ("latents-for-img2img", "tiny-sd15", dict(image=PICTURE, latents=np.zeros((1, 4, 8, 8), np.float32)),
     r"latents= is the initial noise"),
    ("seed-count", "tiny-sd15", dict(num_images_per_prompt=2, seed=[1, 2, 3]), r"seed has 3 values"),
    ("rescale-range", "tiny-sd15", dict(guidance_rescale=1.5), r"guidance_rescale=1\.5"),
    ("negative-count", "tiny-sd15", dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]),
     r"negative_prompt: got 3; pass one, or one per prompt \(2\)"),
    ("image-count", "tiny-sd15", dict(prompt=["a", "b"], image=[PICTURE] * 3), r"image: got 3"),
    ("unknown-scheduler", "tiny-sd15", dict(scheduler="warp_drive"), r"unknown scheduler 'warp_drive'"),
    ("eta-on-euler", "tiny-sdxl", dict(eta=0.5), r"eta"),
    ("rng", "tiny-sd15", dict(rng="jax"), r"rng='jax' is not one of"),
    ("long-prompts-mode", "tiny-sd15", dict(long_prompts="wrap"), r"long_prompts='wrap'"),
    ("chunk-limit", "tiny-sd15", dict(prompt="word " * 400, long_prompts="chunk"),
     r"needs 6 chunks of 75 tokens; .*at most 3"),
    ("latents-as-image-size", "tiny-sdxl-refiner", dict(image=np.zeros((1, 4, 8, 8), np.float32), height=72),
     r"differ from the latents' 64x64"),
    # Pictures are converted while the request is checked, so their faults surface before the text encoders run.
    ("image-nan", "tiny-sd15", dict(image=np.full((64, 64, 3), np.nan, np.float32)), r"image float array has NaN"),
    ("image-float-range", "tiny-sd15", dict(image=np.full((64, 64, 3), 2.0, np.float32)),
     r"image float array has values in \[2, 2\]; expected \[0, 1\]"),
    ("image-float-size", "tiny-sd15", dict(image=np.zeros((40, 40, 3), np.float32), height=64, width=64),
     r"image float array is 40x40, the generation is 64x64"),
    ("image-not-a-picture", "tiny-sd15", dict(image="cat.png"), r"image: an image array must be \[H, W\]"),
    ("mask-nan", "tiny-sd15", dict(image=PICTURE, mask_image=np.full((64, 64), np.nan, np.float32)),
     r"mask_image float array has NaN or Inf"),
    ("mask-range", "tiny-sd15", dict(image=PICTURE, mask_image=np.full((64, 64), -1.0, np.float32)),
     r"mask_image float array has values in \[-1, -1\]"),
    ("mask-dtype", "tiny-sdxl", dict(image=PICTURE, mask_image=np.ones((64, 64), np.int64)),
     r"mask_image array has dtype int64; pass uint8"),
    ("image-latents-nan", "tiny-sdxl-refiner", dict(image=np.full((1, 4, 8, 8), np.inf, np.float32)),
     r"image \(latents\) has NaN or Inf"),
    ("latents-nan", "tiny-sd15", dict(latents=np.full((1, 4, 8, 8), np.nan, np.float32)), r"latents has NaN"),
    ("callback-not-callable", "tiny-sd15", dict(callback=3), r"callback=3 is not callable"),
    ("eta-type", "tiny-sd15", dict(eta="0.5", scheduler="ddim"), r"eta='0\.5' is out of range"),
    ("eta-range", "tiny-sd15", dict(eta=1.5, scheduler="ddim"), r"eta=1\.5 .*0\.0 <= eta <= 1\.0"),
    ("strength-type", "tiny-sd15", dict(image=PICTURE, strength="high"), r"strength='high' is out of range"),
    ("scheduler-config-key", "tiny-sd15", dict(scheduler_config={"warp": 1}),
     r"scheduler_config=\{'warp': 1\}: .*no config key\(s\) \['warp'\]"),
    ("per-prompt-type", "tiny-sd15", dict(num_images_per_prompt=1.5),
     r"num_images_per_prompt=1\.5"),
]


@pytest.mark.parametrize(("preset", "kwargs", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_request_fails_before_any_work(counted: Any, preset: str, kwargs: dict[str, Any],
                                               message: str) -> None:
    pipe, engines = counted(preset)
    args = {"prompt": "a cat", "num_inference_steps": 2, **kwargs}
    with pytest.raises(RequestError, match=message):
        pipe(**args)
    assert {name: e.runs for name, e in engines.items()} == dict.fromkeys(engines, 0)


def test_latents_from_another_latent_space_are_refused(tiny_pipe: Callable[[str], Pipeline], counted: Any) -> None:
    sd_latents = tiny_pipe("tiny-sd15")("a cat", num_inference_steps=1, seed=0, output_type="latent")
    refiner, engines = counted("tiny-sdxl-refiner")
    with pytest.raises(ValueError, match=r"latent space \(0\.18215, 8, 4\).*uses \(0\.13025, 8, 4\)"):
        refiner("a cat", image=sd_latents, denoising_start=0.5, num_inference_steps=2)
    assert sum(e.runs for e in engines.values()) == 0
