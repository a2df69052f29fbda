"""The demo model's architecture (an SD 1.5-family pipeline sized to ship in the package) and how it is saved."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from sdexport.export.tokenizer_files import write_clip_tokenizer

# Diffusion as SD 1.5 trains it; the saved pipeline samples with SD 1.5's default scheduler (PNDM).
TRAIN_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
}
SAMPLE_SCHEDULER: dict[str, Any] = dict(
    TRAIN_SCHEDULER, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)
TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": 32, "hidden_act": "quick_gelu",
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
}
# 64x64 pictures, 4x latent downsampling (4 x 16 x 16 latents): an 8x VAE of this size did not train in the
# CPU budget (a quarter of the drawings read right after 200 updates, against 86% for this one).
VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64,
}
# Cross-attention at 8x8 and 4x4 only (the prompt sets global properties); none at 16x16, which is costly.
UNET: dict[str, Any] = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 16,
}


def new_vae() -> Any:
    """A freshly initialised AutoencoderKL (the caller seeds torch)."""
    import diffusers

    return diffusers.AutoencoderKL(**VAE)


def new_text_models() -> tuple[Any, Any]:
    """A freshly initialised UNet and CLIP text encoder (the caller seeds torch)."""
    import diffusers
    import transformers

    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_ENCODER))
    return diffusers.UNet2DConditionModel(**UNET), text_encoder


def clip_tokenizer() -> Any:
    """The real CLIP BPE tokenizer, written from open-clip-torch's vocabulary."""
    import transformers

    with tempfile.TemporaryDirectory(prefix="sdexport-demo-tok-") as tmp:
        return transformers.CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(tmp) / "tokenizer")))


def save_pipeline(out: Path, vae: Any, unet: Any, text_encoder: Any, tokenizer: Any) -> Path:
    """Save the parts as a diffusers StableDiffusionPipeline folder: fp16 safetensors, PNDM scheduler."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.PNDMScheduler(**SAMPLE_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    # vocab.json + merges.txt (1.5 MB) instead of the 3.6 MB tokenizer.json transformers writes; same tokenizer.
    shutil.rmtree(out / "tokenizer")
    write_clip_tokenizer(out / "tokenizer")
    return out
