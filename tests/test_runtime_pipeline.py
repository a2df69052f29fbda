"""Runtime behaviour: batches, callbacks and cancellation, non-finite guards, CFG fallback, threads, outputs."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

from sdexport.runtime.pipeline import Pipeline
from sdexport.runtime.result import GenerationCancelled, NonFiniteError

STEPS = 3


class Recording:
    """Wraps an engine: records input shapes, optionally corrupts the output of one call."""

    def __init__(self, engine: Any, poison_call: int | None = None) -> None:
        self.engine, self.name, self.inputs, self.outputs = engine, engine.name, engine.inputs, engine.outputs
        self.shapes: list[dict[str, tuple[int, ...]]] = []
        self.poison_call = poison_call

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        self.shapes.append({k: tuple(v.shape) for k, v in feeds.items()})
        out = self.engine.run(feeds)
        if self.poison_call == len(self.shapes) - 1:
            out = {k: np.full_like(v, np.nan) for k, v in out.items()}
        return out


def _with(pipe: Pipeline, name: str, engine: Any, manifest: dict[str, Any] | None = None) -> Pipeline:
    clone = Pipeline(pipe.folder, manifest or pipe.manifest, dict(pipe.engines))
    clone.replace_engine(name, engine)
    return clone


@pytest.fixture(scope="module")
def sdxl(tiny_pipe: Callable[[str], Pipeline]) -> Pipeline:
    return tiny_pipe("tiny-sdxl")


def test_batch_equals_images_made_one_by_one(sdxl: Pipeline) -> None:
    batch = sdxl(["a red circle", "a blue square"], num_images_per_prompt=2, num_inference_steps=STEPS, seed=40,
                 output_type="latent", scheduler="euler_a")  # stochastic: every step draws per-image noise
    assert batch.seeds == [40, 41, 42, 43]
    for index, (prompt, seed) in enumerate(zip(["a red circle"] * 2 + ["a blue square"] * 2, batch.seeds,
                                               strict=True)):
        alone = sdxl(prompt, num_inference_steps=STEPS, seed=seed, output_type="latent", scheduler="euler_a")
        # Same noise, same conditioning: only ONNX Runtime's batch-size-dependent kernels may differ (float32).
        np.testing.assert_allclose(batch.images[index], alone.images[0], atol=1e-5)


def test_callback_sees_every_step_and_can_cancel(sdxl: Pipeline) -> None:
    seen: list[tuple[int, int, float, tuple[int, ...]]] = []
    sdxl("a cat", num_inference_steps=STEPS, seed=1, callback=lambda i, n, t, lat: seen.append((i, n, t, lat.shape)))
    assert [s[0] for s in seen] == list(range(STEPS)) and {s[1] for s in seen} == {STEPS}
    assert seen[0][2] > seen[-1][2] and seen[0][3] == (1, 4, 8, 8)

    with pytest.raises(GenerationCancelled, match="after step 2 of 3") as info:
        sdxl("a cat", num_inference_steps=STEPS, seed=1, callback=lambda i, n, t, lat: i < 1)
    partial = info.value.partial
    assert info.value.step == 1 and partial.output_type == "latent" and partial.images.shape == (1, 4, 8, 8)
    assert len(partial.timings.steps) == 2 and partial.seeds == [1]


@pytest.mark.parametrize(("component", "call", "message"), [
    ("unet", 1, "unet at step 2 produced NaN"),
    ("vae_decoder", 0, "vae_decoder produced NaN"),
    ("vae_encoder", 0, "vae_encoder produced NaN"),
])
def test_non_finite_output_raises_naming_stage_and_step(sdxl: Pipeline, picture: Any, component: str, call: int,
                                                        message: str) -> None:
    pipe = _with(sdxl, component, Recording(sdxl.engines[component], poison_call=call))
    extra = {"image": picture, "strength": 0.7} if component == "vae_encoder" else {}
    with pytest.raises(NonFiniteError, match=message) as info:
        pipe("a cat", num_inference_steps=STEPS, seed=1, **extra)
    assert info.value.stage == component


def test_cfg_falls_back_to_two_calls_when_the_unet_batch_range_is_small(sdxl: Pipeline) -> None:
    args = dict(prompt=["a", "b"], num_images_per_prompt=2, num_inference_steps=STEPS, seed=3, output_type="latent")
    normal = Recording(sdxl.engines["unet"])
    reference = _with(sdxl, "unet", normal)(**args).images
    manifest = copy.deepcopy(sdxl.manifest)
    for profile in manifest["components"]["unet"]["profile"].values():
        profile["max"][0] = 4  # an engine built for 4 rows cannot take the 8-row guidance batch of 4 images
    small = Recording(sdxl.engines["unet"])
    split = _with(sdxl, "unet", small, manifest)(**args).images
    assert [s["sample"][0] for s in normal.shapes] == [8] * STEPS
    assert [s["sample"][0] for s in small.shapes] == [4, 4] * STEPS
    np.testing.assert_allclose(split, reference, atol=1e-5)


def test_threads_get_the_results_they_would_get_alone(sdxl: Pipeline) -> None:
    jobs = [dict(prompt=p, seed=s, num_inference_steps=STEPS, output_type="latent", scheduler=sch)
            for p, s, sch in [("a", 1, None), ("b", 2, "euler_a"), ("c", 3, "dpmpp_2m"), ("d", 4, "heun")]]
    alone = [sdxl(**job).images for job in jobs]
    results: list[Any] = [None] * len(jobs)

    def work(index: int) -> None:
        for _ in range(2):
            results[index] = sdxl(**jobs[index]).images

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, alone, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_output_types_and_timings(sdxl: Pipeline) -> None:
    outs = {t: sdxl("a cat", num_inference_steps=STEPS, seed=5, height=72, width=56, output_type=t,
                    num_images_per_prompt=2) for t in ("pil", "np", "np_float", "latent")}
    assert [im.size for im in outs["pil"].images] == [(56, 72)] * 2
    assert outs["np"].images.dtype == np.uint8 and outs["np"].images.shape == (2, 72, 56, 3)
    np.testing.assert_array_equal(outs["np"].images, np.stack([np.asarray(im) for im in outs["pil"].images]))
    np.testing.assert_array_equal(outs["np"].images, (outs["np_float"].images * 255).round().astype(np.uint8))
    assert outs["latent"].images.shape == (2, 4, 9, 7)
    timings = outs["pil"].timings
    assert len(timings.unet) == len(timings.steps) == STEPS
    assert timings.text_encoder > 0 and timings.vae_decoder > 0 and timings.vae_encoder == 0
    assert all(s >= u > 0 for s, u in zip(timings.steps, timings.unet, strict=True))
    assert timings.total >= timings.text_encoder + sum(timings.steps) + timings.vae_decoder
    assert outs["latent"].timings.vae_decoder == 0


def test_random_seeds_are_reported_and_reproduce(sdxl: Pipeline) -> None:
    first = sdxl("a cat", num_inference_steps=STEPS, output_type="latent")
    again = sdxl("a cat", num_inference_steps=STEPS, seed=first.seeds, output_type="latent")
    np.testing.assert_array_equal(first.images, again.images)


def test_long_prompts_truncate_with_a_warning_or_run_in_chunks(sdxl: Pipeline, caplog: Any) -> None:
    prompt = " ".join(f"word{i}" for i in range(60))  # 170 tokens: CLIP splits the digits
    chunks = sdxl.tokenizers["tokenizer"].chunks_needed(prompt)
    assert chunks == 3
    recording = Recording(sdxl.engines["unet"])
    pipe = _with(sdxl, "unet", recording)
    with caplog.at_level(logging.WARNING, logger="sdexport.runtime"):
        truncated = pipe(prompt, num_inference_steps=1, seed=2, output_type="latent")
    assert "truncated because CLIP can only handle sequences up to 77 tokens" in caplog.text
    dropped = caplog.text.split("77 tokens:")[1]  # CLIP splits digits: "word59" decodes as "word 5 9"
    assert "word 5 9" in dropped and "word 1 " not in dropped
    chunked = pipe(prompt, num_inference_steps=1, seed=2, output_type="latent", long_prompts="chunk")
    assert [s["encoder_hidden_states"][1] for s in recording.shapes] == [77, 77 * chunks]
    assert not np.allclose(truncated.images, chunked.images)


def test_load_picks_scheduler_and_replace_engine_checks_tensors(tiny_folder: Callable[[str], Any],
                                                                 sdxl: Pipeline) -> None:
    pipe = Pipeline.load(tiny_folder("tiny-sdxl"), scheduler="dpmpp_2m_sde", scheduler_config={
        "use_karras_sigmas": True})
    assert pipe.scheduler.class_name == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config["algorithm_type"] == "sde-dpmsolver++" and pipe.scheduler.config["use_karras_sigmas"]
    with pytest.raises(ValueError, match="inputs"):
        pipe.replace_engine("unet", sdxl.engines["vae_decoder"])
    with pytest.raises(ValueError, match="not a component"):
        pipe.replace_engine("safety_checker", sdxl.engines["unet"])
