"""sdexport.build() from an in-memory diffusers pipeline: a custom attention processor is compiled as it is.

The processor divides the cross-attention scores by a temperature; the folder must match diffusers running that
same modified pipeline, differ from the unmodified model, and record where it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fakes.parity import IMAGE_ATOL, LATENT_ATOL, SMALL_RANGES
from fakes.processors import TemperatureProcessor, set_cross_attention
from sdexport.errors import SourceError
from sdexport.export.build import BuildConfig, build
from sdexport.export.load import inspect_source, load_source
from sdexport.export.memory_source import memory_parts
from sdexport.runtime.pipeline import Pipeline

PRESET = "tiny-sd15"
CUSTOM = "fakes.processors.TemperatureProcessor"
STANDARD = "diffusers.models.attention_processor.AttnProcessor2_0"


def _modified_pipe(temperature: float) -> Any:
    pipe = load_source(inspect_source(PRESET)).pipe
    set_cross_attention(pipe.unet, TemperatureProcessor(temperature))
    return pipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("in-memory") / "folder"
    source = _modified_pipe(0.5)
    result = build(BuildConfig(model=source, out=folder, ranges=SMALL_RANGES))
    return {"folder": folder, "source": source, "result": result, "pipe": Pipeline.load(folder)}


@pytest.mark.parametrize("kwargs", [dict(prompt="a red circle", num_inference_steps=4),
                                    dict(prompt="a red circle", guidance_scale=1.0, num_inference_steps=4)],
                         ids=["cfg", "no-cfg"])
def test_custom_processor_matches_diffusers(setup: dict[str, Any], parity_run: Any, tiny_pipe: Any,
                                            kwargs: dict[str, Any]) -> None:
    run = parity_run(PRESET, "txt2img", seeds=[31], pipe=setup["pipe"], source_pipe=setup["source"], **kwargs)
    assert run.latent_diff <= LATENT_ATOL, f"final latents differ by {run.latent_diff:.3g}"
    assert run.image_diff <= IMAGE_ATOL, f"images differ by {run.image_diff * 255:.3g}/255"
    plain = tiny_pipe(PRESET)(**kwargs, seed=[31], rng="torch", output_type="latent").images
    assert np.abs(plain - run.latents).max() > 1e-3, "the custom processor did not change the compiled model"


def test_manifest_records_the_memory_source_and_each_processor(setup: dict[str, Any]) -> None:
    manifest = setup["result"].manifest
    assert manifest["source"]["kind"] == "memory"
    assert manifest["source"]["id"] == "in-memory StableDiffusionPipeline"
    layers = manifest["components"]["unet"]["attention_processors"]
    assert {v["class"] for k, v in layers.items() if k.endswith("attn2")} == {CUSTOM}
    assert {v["export"] for k, v in layers.items() if k.endswith("attn2")} == {"as-is"}
    assert {v["class"] for k, v in layers.items() if k.endswith("attn1")} == {STANDARD}
    assert {v["export"] for k, v in layers.items() if k.endswith("attn1")} == {"constant-scale"}
    assert set(manifest["components"]["vae_decoder"]["attention_processors"]) == {"decoder.mid_block.attentions.0"}


def test_same_pipeline_reuses_the_build_and_a_changed_processor_changes_the_key(setup: dict[str, Any]) -> None:
    again = build(BuildConfig(model=setup["source"], out=setup["folder"], ranges=SMALL_RANGES))
    assert again.up_to_date
    info = inspect_source(setup["source"])
    assert info.fingerprint == setup["result"].manifest["source"]["hash"]
    processor = setup["source"].unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    processor.temperature = 0.7  # same weights and class, another temperature
    try:
        assert inspect_source(setup["source"]).fingerprint != info.fingerprint
    finally:
        processor.temperature = 0.5


def test_a_dict_of_parts_is_the_same_source(setup: dict[str, Any]) -> None:
    pipe = setup["source"]
    parts = {k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    from_parts, from_pipe = inspect_source(parts), inspect_source(pipe)
    assert from_parts.spec.components == from_pipe.spec.components
    assert from_parts.kind == "memory"


def test_build_with_changes_leaves_the_callers_modules_alone(setup: dict[str, Any]) -> None:
    info = inspect_source(setup["source"])
    private = load_source(info, private=True)
    shared = load_source(info)
    assert private.pipe.unet is not setup["source"].unet
    assert shared.pipe.unet is setup["source"].unet


def test_incomplete_sources_are_refused(setup: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no vae"):
        memory_parts({"unet": setup["source"].unet, "scheduler": setup["source"].scheduler})
    with pytest.raises(SourceError, match="no tokenizer"):
        memory_parts({k: getattr(setup["source"], k) for k in ("unet", "vae", "text_encoder", "scheduler")})
    unet = setup["source"].unet
    unet.encoder_hid_proj = torch.nn.Identity()  # what pipe.load_ip_adapter leaves on the UNet
    try:
        with pytest.raises(SourceError, match="ip_adapter=PATH"):
            memory_parts(setup["source"])
    finally:
        unet.encoder_hid_proj = None
