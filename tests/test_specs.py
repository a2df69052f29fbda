"""Specs: family detection from configs, shape ranges -> profiles, and their validation."""

from __future__ import annotations

import pytest

from sdexport.specs import PRESETS, ModelSpec, ShapeRanges, detect_family, model_spec


def _spec(preset: str) -> ModelSpec:
    cfg = PRESETS[preset].configs()
    texts = {n: cfg[n] for n in ("text_encoder", "text_encoder_2") if n in cfg}
    return model_spec(cfg["unet"], cfg["vae"], texts, cfg["model_index"])


def test_family_comes_from_configs_not_names() -> None:
    sdxl = PRESETS["sdxl"].configs()
    texts = {n: sdxl[n] for n in ("text_encoder", "text_encoder_2")}
    assert detect_family(sdxl["unet"], texts) == "sdxl"
    assert detect_family(sdxl["unet"], {"text_encoder_2": texts["text_encoder_2"]}) == "sdxl-refiner"
    sd15, sd21 = PRESETS["sd15"].configs(), PRESETS["sd21"].configs()
    assert detect_family(sd15["unet"], {"text_encoder": sd15["text_encoder"]}) == "sd"
    # SD 2.x has the same UNet kind as SD 1.x: its OpenCLIP text encoder (gelu, not quick_gelu) tells them apart.
    assert detect_family(sd21["unet"], {"text_encoder": sd21["text_encoder"]}) == "sd2"
    assert detect_family(sd15["unet"], {"text_encoder": sd21["text_encoder"]}) == "sd2"
    with pytest.raises(ValueError, match="addition_embed_type='image'"):
        detect_family({"addition_embed_type": "image"}, {"text_encoder": {}})


@pytest.mark.parametrize(("preset", "cross", "time_ids", "inpaint"), [
    ("sd15", 768, 0, False), ("sd15-inpaint", 768, 0, True), ("sdxl", 2048, 6, False),
    ("sdxl-refiner", 1280, 5, False), ("sdxl-inpaint", 2048, 6, True), ("sd21", 1024, 0, False),
])
def test_full_size_specs(preset: str, cross: int, time_ids: int, inpaint: bool) -> None:
    spec = _spec(preset)
    unet = {t.name: t for t in spec.components["unet"].inputs}
    assert unet["encoder_hidden_states"].dims[2] == cross
    assert unet["sample"].dims[1] == (9 if inpaint else 4)
    assert spec.time_ids_dim == time_ids
    assert spec.vae_scale_factor == 8
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_profile_doubles_batch_for_guidance_and_scales_latents() -> None:
    spec = _spec("sdxl")
    ranges = ShapeRanges(batch=(1, 2, 4), height=(512, 1024, 1536), width=(768, 1024, 1280), prompt_chunks=2)
    unet = ranges.profile(spec.components["unet"], spec.vae_scale_factor)
    assert unet["sample"] == {"min": [1, 4, 64, 96], "opt": [4, 4, 128, 128], "max": [8, 4, 192, 160]}
    assert unet["encoder_hidden_states"] == {"min": [1, 77, 2048], "opt": [4, 77, 2048], "max": [8, 154, 2048]}
    assert unet["time_ids"]["max"] == [8, 6]
    vae = ranges.profile(spec.components["vae_decoder"], spec.vae_scale_factor)
    assert vae["latent"] == {"min": [1, 4, 64, 96], "opt": [2, 4, 128, 128], "max": [4, 4, 192, 160]}
    text = ranges.profile(spec.components["text_encoder"], spec.vae_scale_factor)
    # negative + positive, each prompt split into up to 2 chunks of 77 tokens
    assert text["input_ids"]["max"] == [16, 77]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"height": (512, 500, 1024)}, "height range"),
    ({"width": (516, 520, 1024)}, "not a multiple of 8"),
    ({"batch": (0, 1, 4)}, "batch range"),
    ({"prompt_chunks": 0}, "prompt_chunks"),
])
def test_bad_ranges_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShapeRanges(**kwargs).validate(8)
