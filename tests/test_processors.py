"""Attention processors at export: untraceable ones fail the build naming layer and class; custom ones are traced
as written (never in the constant-scale form); the record lists each layer's processor class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fakes.parity import SMALL_RANGES
from fakes.processors import BranchingProcessor, ItemProcessor, SdpaProcessor, set_cross_attention
from sdexport.engines import artifacts
from sdexport.export import attention
from sdexport.export.build import BuildConfig, build
from sdexport.export.load import inspect_source, load_source
from sdexport.export.processors import UntraceableProcessorError, processor_record, trace_guard
from sdexport.export.wrappers import wrap

PRESET = "tiny-sd15"
FIRST_CROSS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def source() -> Any:
    return load_source(inspect_source(PRESET))


@pytest.fixture
def unet_with(source: Any) -> Any:
    """``unet_with(processor)`` sets it on every cross-attention layer; the standard ones come back afterwards."""
    saved = dict(source.pipe.unet.attn_processors)

    def put(processor: Any) -> Any:
        set_cross_attention(source.pipe.unet, processor)
        return source.pipe.unet

    yield put
    source.pipe.unet.set_attn_processor(saved)


def test_data_dependent_branch_fails_the_build_naming_layer_and_class(source: Any, unet_with: Any,
                                                                      tmp_path: Path) -> None:
    unet_with(BranchingProcessor(1.0))
    with pytest.raises(UntraceableProcessorError) as caught:
        build(BuildConfig(model=source.pipe, out=tmp_path / "out", ranges=SMALL_RANGES))
    message = str(caught.value)
    assert message.startswith("unet: ")
    assert f"{FIRST_CROSS} (fakes.processors.BranchingProcessor)" in message
    assert "Python boolean" in message
    assert not (tmp_path / "out" / artifacts.MANIFEST).exists()


def test_reading_a_tensor_value_fails_the_trace(source: Any, unet_with: Any) -> None:
    unet_with(ItemProcessor(1.0))
    wrapper = wrap(source.pipe, source.spec, source.spec.components["unet"])
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 32))
    expected = r"ItemProcessor\): Converting a tensor to a Python number"
    with pytest.raises(UntraceableProcessorError, match=expected), torch.no_grad(), trace_guard(wrapper, "unet"):
        torch.jit.trace(wrapper, inputs, check_trace=False)


def _explicit_calls(monkeypatch: pytest.MonkeyPatch, wrapper: Any) -> int:
    """How often the constant-scale attention path runs in one traced-style forward of ``wrapper``."""
    calls = []
    original = attention.explicit_attention
    monkeypatch.setattr(attention, "explicit_attention", lambda *a: calls.append(1) or original(*a))
    sample, timestep, states = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 32)
    with torch.no_grad(), attention.constant_scale_attention(), trace_guard(wrapper, "unet"):
        wrapper(sample, timestep, states)
    return len(calls)


def test_custom_processors_are_traced_as_written(source: Any, unet_with: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    standard = _explicit_calls(monkeypatch, wrap(source.pipe, source.spec, source.spec.components["unet"]))
    unet_with(SdpaProcessor(0.5))
    wrapper = wrap(source.pipe, source.spec, source.spec.components["unet"])
    custom = _explicit_calls(monkeypatch, wrapper)
    assert standard == len(source.pipe.unet.attn_processors)  # every standard layer takes the constant-scale path
    assert custom == standard // 2  # only the self-attention layers; the custom cross-attention runs as written
    record = processor_record(wrapper)
    assert record[FIRST_CROSS] == {"class": "fakes.processors.SdpaProcessor", "export": "as-is"}
