"""Optimisation profiles and static buckets derived from the specs' shape ranges; profile selection at run time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdexport.engines.tensorrt.profiles import (
    Bucket,
    ProfileSpec,
    check_profile,
    component_profiles,
    default_buckets,
    is_spatial,
    select_profile,
)
from sdexport.errors import CompatibilityError
from sdexport.specs import ShapeRanges, model_spec
from sdexport.specs.presets import FAMILY_PRESETS, TINY_RANGES

SDXL = FAMILY_PRESETS["sdxl"]


def _spec(preset: str = "sdxl"):  # noqa: ANN202 - a ModelSpec
    data = json.loads((Path(__file__).parents[1] / "sdexport/specs/data" / f"{preset}.json").read_text())
    texts = {n: data[n] for n in ("text_encoder", "text_encoder_2") if n in data}
    return model_spec(data["unet"], data["vae"], texts)


def test_sdxl_default_buckets_are_square_plus_sdxl_training_aspect_ratios() -> None:
    labels = [b.label for b in default_buckets(SDXL.default_ranges, 8)]
    assert labels == ["1024x1024", "1152x896", "896x1152", "1344x768", "768x1344"]


def test_buckets_outside_the_ranges_are_dropped_and_tiny_models_get_a_finer_grid() -> None:
    narrow = ShapeRanges(batch=(1, 1, 2), height=(1024, 1024, 1024), width=(768, 1024, 1344))
    assert [b.label for b in default_buckets(narrow, 8)] == ["1024x1024"]
    tiny = default_buckets(TINY_RANGES, 8)
    assert tiny[0] == Bucket(64, 64) and all(b.width % 8 == 0 and b.height % 8 == 0 for b in tiny)
    assert len(tiny) == 5


def test_static_unet_profiles_fix_spatial_dims_and_keep_the_cfg_batch_range() -> None:
    spec = _spec()
    unet = spec.components["unet"]
    profiles = component_profiles(unet, SDXL.default_ranges, 8, "static", [Bucket(1152, 896)])
    assert len(profiles) == 1 and profiles[0].kind == "static" and profiles[0].label == "1152x896"
    sample = profiles[0].shapes["sample"]
    assert sample["min"] == [1, 4, 112, 144] and sample["max"] == [8, 4, 112, 144]  # CFG doubles batch 4 -> 8
    assert sample["opt"] == [2, 4, 112, 144]
    check_profile(profiles[0], unet)


def test_modes_dynamic_and_both_and_text_encoders_always_dynamic() -> None:
    spec = _spec()
    ranges = SDXL.default_ranges
    unet, te = spec.components["unet"], spec.components["text_encoder"]
    assert is_spatial(unet) and not is_spatial(te)
    dynamic = component_profiles(unet, ranges, 8, "dynamic")
    assert [p.kind for p in dynamic] == ["dynamic"]
    assert dynamic[0].shapes == ranges.profile(unet, 8)
    both = component_profiles(unet, ranges, 8, "both")
    assert [p.kind for p in both] == ["static"] * 5 + ["dynamic"]
    assert [p.kind for p in component_profiles(te, ranges, 8, "static")] == ["dynamic"]
    for profile in both:
        check_profile(profile, unet)
    with pytest.raises(ValueError, match="shape mode"):
        component_profiles(unet, ranges, 8, "fast")


def test_explicit_buckets_are_checked_against_the_ranges_and_grid() -> None:
    unet = _spec().components["unet"]
    with pytest.raises(ValueError, match="2048x1024: width outside"):
        component_profiles(unet, SDXL.default_ranges, 8, "static", [Bucket(2048, 1024)])
    with pytest.raises(ValueError, match="multiples of 8"):
        component_profiles(unet, SDXL.default_ranges, 8, "static", [Bucket(1020, 1024)])
    assert Bucket.parse("1152x896") == Bucket(1152, 896)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        Bucket.parse("1152")


def test_check_profile_rejects_what_tensorrt_would() -> None:
    unet = _spec().components["unet"]
    good = component_profiles(unet, SDXL.default_ranges, 8, "dynamic")[0]
    shapes = json.loads(json.dumps(good.shapes))
    shapes["sample"]["min"][1] = 3  # channels are fixed at 4 in the graph
    with pytest.raises(ValueError, match="fixed at 4"):
        check_profile(ProfileSpec("dynamic", "x", shapes), unet)
    shapes = json.loads(json.dumps(good.shapes))
    shapes["sample"]["opt"][0] = 99
    with pytest.raises(ValueError, match="min <= opt <= max"):
        check_profile(ProfileSpec("dynamic", "x", shapes), unet)
    del shapes["timestep"]
    with pytest.raises(ValueError, match="inputs"):
        check_profile(ProfileSpec("dynamic", "x", shapes), unet)


def test_selection_prefers_the_fitting_static_bucket_then_dynamic_then_refuses() -> None:
    unet = _spec().components["unet"]
    profiles = component_profiles(unet, SDXL.default_ranges, 8, "both")
    feeds = {"sample": (2, 4, 128, 128), "timestep": (2,), "encoder_hidden_states": (2, 77, 2048),
             "text_embeds": (2, 1280), "time_ids": (2, 6)}
    assert profiles[select_profile("unet", profiles, feeds)].label == "1024x1024"
    portrait = dict(feeds, sample=(2, 4, 144, 112))
    assert profiles[select_profile("unet", profiles, portrait)].label == "896x1152"
    odd = dict(feeds, sample=(2, 4, 100, 100))
    assert profiles[select_profile("unet", profiles, odd)].kind == "dynamic"
    static_only = profiles[:-1]
    with pytest.raises(CompatibilityError, match="no engine profile accepts .*--bucket WIDTHxHEIGHT"):
        select_profile("unet", static_only, odd)
    with pytest.raises(CompatibilityError):
        select_profile("unet", profiles, dict(feeds, sample=(9, 4, 128, 128)))  # batch beyond the range


def test_profile_round_trips_through_json() -> None:
    profile = component_profiles(_spec("sd15").components["vae_decoder"], FAMILY_PRESETS["sd15"].default_ranges,
                                 8, "static")[0]
    assert ProfileSpec.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_ort_gpu_providers_carry_the_folder_profile_and_caches(tmp_path: Path) -> None:
    from sdexport.engines.ort import check_providers
    from sdexport.engines.tensorrt.profiles import ort_gpu_providers

    profile = {"sample": {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 32, 32]},
               "timestep": {"min": [1], "opt": [2], "max": [8]}}
    providers = ort_gpu_providers(profile, tmp_path, device=1, optimization_level=5, cuda_graphs=True)
    name, options = providers[0]
    assert name == "TensorrtExecutionProvider" and providers[1:] == [("CUDAExecutionProvider", {"device_id": 1}),
                                                                     "CPUExecutionProvider"]
    assert options["trt_profile_min_shapes"] == "sample:1x4x4x4,timestep:1"
    assert options["trt_profile_max_shapes"] == "sample:8x4x32x32,timestep:8"
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(tmp_path)
    assert options["trt_builder_optimization_level"] == 5 and options["trt_cuda_graph_enable"] is True
    assert "trt_fp16_enable" not in options
    assert [p if isinstance(p, str) else p[0] for p in ort_gpu_providers(profile, tmp_path, tensorrt=False)] == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    # On a machine without them, ONNX Runtime drops both GPU providers; check_providers says so.
    assert check_providers(providers, ["CPUExecutionProvider"], tmp_path / "g.onnx") == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider"]
