"""The family registry: lookups and errors, a family registered by a test, and every derived table vs the records."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sdexport.cli import main
from sdexport.errors import UsageError
from sdexport.export.load import inspect_source, source_identity
from sdexport.runtime.args import GenerationArgs
from sdexport.runtime.conditioning import CONDITIONERS, conditioner_for
from sdexport.runtime.request import build_request
from sdexport.specs import (
    FAMILY_PRESETS,
    PRESETS,
    SHIPPED_PRESETS,
    TINY_PRESETS,
    ModelSpec,
    detect_family,
    families,
    family,
    model_spec,
    register_family,
)
from sdexport.specs.families import CallDefaults, Detection, unregister_family
from sdexport.specs.presets import TINY_RANGES, default_ranges_for

BUILTIN = ("sd", "sd2", "sdxl", "sdxl-refiner")


def _configs(preset: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    cfg = PRESETS[preset].configs()
    return cfg, {n: cfg[n] for n in ("text_encoder", "text_encoder_2") if n in cfg}


def _spec(preset: str) -> ModelSpec:
    cfg, texts = _configs(preset)
    return model_spec(cfg["unet"], cfg["vae"], texts, cfg["model_index"])


def test_builtin_families_are_registered_under_their_manifest_names() -> None:
    # Folders built before the registry store these strings: they must keep resolving.
    assert tuple(families()) == BUILTIN
    assert all(family(name).name == name for name in BUILTIN)


def test_unknown_family_error_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'sd3'") as exc:
        family("sd3")
    assert all(name in str(exc.value) for name in BUILTIN)
    data = _spec("tiny-sd15").to_dict()
    with pytest.raises(ValueError, match="known families: sd, sd2, sdxl, sdxl-refiner"):
        ModelSpec.from_dict({**data, "family": "sd3"})


def test_registering_twice_or_with_the_same_detection_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_family(family("sd"))
    with pytest.raises(ValueError, match="detected like 'sd'"):
        register_family(dataclasses.replace(family("sd"), name="sd-copy"))
    assert "sd-copy" not in families()


def test_a_record_with_inconsistent_tasks_is_refused() -> None:
    with pytest.raises(ValueError, match="must name the same tasks"):
        dataclasses.replace(family("sd"), call_defaults={"txt2img": CallDefaults(7.5)})
    with pytest.raises(ValueError, match="exactly one pooled text encoder"):
        dataclasses.replace(family("sd"), time_ids="size")


@pytest.fixture
def test_family() -> Iterator[str]:
    """A family of SD UNets whose text encoder uses gelu_new, registered for one test."""
    record = dataclasses.replace(
        family("sd"), name="test-family", description="registered by a test",
        detection=Detection(addition_embed_type=None, text_encoder_act="gelu_new"),
        call_defaults={"txt2img": CallDefaults(3.0), "img2img": CallDefaults(4.0, 0.5),
                       "inpaint": CallDefaults(5.0, 0.9)},
    )
    register_family(record)
    yield record.name
    unregister_family(record.name)


def _request_args(**overrides: Any) -> GenerationArgs:
    return GenerationArgs(**overrides)


def test_a_registered_family_is_listed_detected_and_used(test_family: str) -> None:
    assert test_family in families()
    with pytest.raises(ValueError, match=f"known families: .*{test_family}"):
        family("nope")
    cfg, texts = _configs("tiny-sd15")
    texts = {"text_encoder": {**texts["text_encoder"], "hidden_act": "gelu_new"}}
    assert detect_family(cfg["unet"], texts) == test_family
    spec = model_spec(cfg["unet"], cfg["vae"], texts, cfg["model_index"])
    assert spec.family == test_family and spec.text_encoders == ("text_encoder",)
    request = build_request(spec, TINY_RANGES, _request_args(prompt="a cat"), lambda prompts: 1)
    assert request.guidance_scale == 3.0  # the family's own call defaults
    assert type(conditioner_for(spec, {"tokenizer": object()})) is CONDITIONERS[family(test_family).conditioner]


def test_unclaimed_configs_name_the_families() -> None:
    cfg, _ = _configs("tiny-sd15")
    with pytest.raises(ValueError, match="hidden_act='relu'.*known families: sd, sd2"):
        detect_family(cfg["unet"], {"text_encoder": {"hidden_act": "relu"}})


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_agree_with_their_family_record(preset: str) -> None:
    spec, record = _spec(preset), family(PRESETS[preset].family)
    assert spec.family == record.name  # the preset line names the family its configs are detected as
    # tiny and shipped (demo, 64 px) models keep the tiny ranges; released ones their family's documented ranges
    small = preset in TINY_PRESETS or preset in SHIPPED_PRESETS
    assert PRESETS[preset].default_ranges == (TINY_RANGES if small else record.default_ranges)
    assert spec.text_encoders == record.encoder_names
    assert {n: c.fp16_by_default for n, c in spec.components.items()} == {
        n: n not in record.fp32_components for n in spec.components}
    assert ("text_embeds" in [t.name for t in spec.components["unet"].inputs]) == record.added_conditions
    assert spec.latent_channels == record.latent_channels == PRESETS[preset].configs()["vae"]["latent_channels"]


def test_every_released_preset_has_a_tiny_twin_of_the_same_family() -> None:
    assert len(TINY_PRESETS) == len(FAMILY_PRESETS)
    assert sorted(p.family for p in TINY_PRESETS.values()) == sorted(p.family for p in FAMILY_PRESETS.values())
    assert {p.family for p in FAMILY_PRESETS.values()} == set(BUILTIN)
    assert default_ranges_for("sd2", tiny=False) == family("sd2").default_ranges
    assert default_ranges_for("sdxl", tiny=True) == TINY_RANGES


@pytest.mark.parametrize("name", BUILTIN)
def test_call_defaults_are_diffusers_own(name: str) -> None:
    import diffusers

    record = family(name)
    assert record.conditioner in CONDITIONERS
    for task, class_name in record.pipelines.items():
        params = inspect.signature(getattr(diffusers, class_name).__call__).parameters
        assert params["guidance_scale"].default == record.call_defaults[task].guidance_scale, (name, task)
        expected = params["strength"].default if "strength" in params else None
        assert record.call_defaults[task].strength == expected, (name, task)
        init = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        assert all(e.name in init and e.tokenizer in init for e in record.text_encoders), class_name


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sd2", "tiny-sdxl", "tiny-sdxl-refiner"])
def test_source_pipelines_and_tokenizers_follow_the_record(tiny_source: Callable[[str], Any], preset: str) -> None:
    from sdexport.export.parity import diffusers_pipeline

    source = tiny_source(preset)
    record = family(source.spec.family)
    assert type(source.pipe).__name__ == record.source_pipeline
    for enc in record.text_encoders:
        assert getattr(source.pipe, enc.tokenizer).pad_token == enc.pad_token
    for task in record.tasks:
        assert type(diffusers_pipeline(source.pipe, source.spec, task)).__name__ == record.pipelines[task]
    missing = [t for t in ("txt2img", "img2img", "inpaint") if t not in record.tasks]
    for task in missing:
        with pytest.raises(ValueError, match=f"no diffusers pipeline for task '{task}'"):
            diffusers_pipeline(source.pipe, source.spec, task)


def test_model_choices_come_from_the_presets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    assert ",".join(PRESETS) in help_text
    with pytest.raises(UsageError) as exc:
        source_identity("acme/model", random_weights=True)
    assert all(name in str(exc.value) for name in FAMILY_PRESETS)


def test_sd21_preset_is_the_released_architecture() -> None:
    info = inspect_source("sd21", random_weights=True)  # configs only: no weights are loaded
    unet = {t.name: t for t in info.spec.components["unet"].inputs}
    assert info.spec.family == "sd2" and info.kind == "random"
    assert unet["encoder_hidden_states"].dims[2] == 1024 and list(unet) == ["sample", "timestep",
                                                                            "encoder_hidden_states"]
    assert info.configs["scheduler"]["prediction_type"] == "v_prediction"
    assert info.configs["text_encoder"]["num_hidden_layers"] == 23  # OpenCLIP-H without its last layer
    assert info.spec.clip_skip_max == 4 and info.spec.scaling_factor == 0.18215


def test_task_support_comes_from_the_record() -> None:
    assert all(family(name).task_error(task) is None for name in ("sd", "sd2", "sdxl") for task in
               ("txt2img", "img2img", "inpaint"))
    message = family("sdxl-refiner").task_error("txt2img")
    assert "does not run txt2img (it runs img2img, inpaint)" in message and "pass image=" in message
