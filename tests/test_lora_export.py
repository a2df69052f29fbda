"""LoRAs fused before export: the exported weights equal W + weight * (alpha / r) * B @ A computed here by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from sdexport.engines.artifacts import load_manifest, sha256_file
from sdexport.export.build import BuildConfig, build
from sdexport.export.load import inspect_source, load_source
from sdexport.export.lora import LoraSpec

RANK, ALPHA = 4, 8


def _make_lora(folder: Path, seed: int) -> Path:
    """A LoRA on the tiny SD UNet attention and text-encoder projections, saved as diffusers safetensors."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    pipe = load_source(inspect_source("tiny-sd15")).pipe
    unet_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False,
                          target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    pipe.unet.add_adapter(unet_cfg)
    # peft directly: transformers' own add_adapter demands a newer peft than the registry has.
    te_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    inject_adapter_in_model(te_cfg, pipe.text_encoder)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder), safe_serialization=True,
        # alpha travels in the file's metadata; without it loaders assume alpha == r
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors"


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("lora")
    lora_a, lora_b = _make_lora(root / "a", 1), _make_lora(root / "b", 2)
    base = root / "base"
    build(BuildConfig(model="tiny-sd15", out=base))
    return root, lora_a, lora_b


def _expected(base: dict[str, np.ndarray], lora_file: Path, weight: float, prefix: str, graph_prefix: str
              ) -> dict[str, np.ndarray]:
    """W + weight * alpha/r * B @ A for every layer the LoRA file targets under ``prefix``."""
    from safetensors.numpy import load_file

    tensors = load_file(str(lora_file))
    out = {}
    for key, down in tensors.items():
        if not key.startswith(prefix) or ".lora_A." not in key:
            continue
        up = tensors[key.replace(".lora_A.", ".lora_B.")]
        layer = key[len(prefix):].split(".lora_A.")[0]
        name = f"{graph_prefix}{layer}.weight"
        out[name] = base[name] + weight * (ALPHA / RANK) * (up.astype(np.float64) @ down.astype(np.float64))
    return out


def test_fused_lora_matches_hand_computed_weights(setup: tuple[Path, Path, Path]) -> None:
    root, lora_a, _ = setup
    out = root / "with-a"
    build(BuildConfig(model="tiny-sd15", out=out, loras=[LoraSpec(lora_a, 0.7)]))
    base_unet = _initializers(root / "base" / "unet" / "model.onnx")
    fused_unet = _initializers(out / "unet" / "model.onnx")
    expected = _expected(base_unet, lora_a, 0.7, "unet.", "unet.")
    assert len(expected) >= 8
    for name, value in expected.items():
        # fp32 fusion in torch vs float64 by hand: a few ulps.
        np.testing.assert_allclose(fused_unet[name], value, atol=1e-6, rtol=1e-5, err_msg=name)
    untouched = [n for n in base_unet if n not in expected]
    for name in untouched:
        np.testing.assert_array_equal(fused_unet[name], base_unet[name], err_msg=name)

    base_te = _initializers(root / "base" / "text_encoder" / "model.onnx")
    fused_te = _initializers(out / "text_encoder" / "model.onnx")
    expected_te = _expected(base_te, lora_a, 0.7, "text_encoder.", "model.")
    assert expected_te
    for name, value in expected_te.items():
        np.testing.assert_allclose(fused_te[name], value, atol=1e-6, rtol=1e-5, err_msg=name)

    manifest = load_manifest(out)
    (record,) = manifest["loras"]
    assert record["weight"] == 0.7 and record["sha256"] == sha256_file(lora_a)
    assert record["components"] == ["text_encoder", "unet"]


def test_changing_loras_rebuilds_only_lora_targets(setup: tuple[Path, Path, Path]) -> None:
    root, lora_a, lora_b = setup
    out = root / "swap"
    build(BuildConfig(model="tiny-sd15", out=out, loras=[LoraSpec(lora_a, 0.7)]))
    result = build(BuildConfig(model="tiny-sd15", out=out, loras=[LoraSpec(lora_a, 0.7), LoraSpec(lora_b, 0.3)]))
    assert sorted(result.built) == ["text_encoder", "unet"]
    assert sorted(result.reused) == ["vae_decoder", "vae_encoder"]
    fused = _initializers(out / "unet" / "model.onnx")
    base = _initializers(root / "base" / "unet" / "model.onnx")
    exp_a = _expected(base, lora_a, 0.7, "unet.", "unet.")
    exp_b = _expected(base, lora_b, 0.3, "unet.", "unet.")
    for name in exp_a:
        np.testing.assert_allclose(fused[name], exp_a[name] + exp_b[name] - base[name], atol=1e-6, rtol=1e-5)
    assert [r["weight"] for r in load_manifest(out)["loras"]] == [0.7, 0.3]
    assert build(BuildConfig(model="tiny-sd15", out=out, loras=[LoraSpec(lora_a, 0.7), LoraSpec(lora_b, 0.3)])
                 ).up_to_date
