"""SDXL base / inpaint: two CLIP encoders read at the penultimate layer, pooled text_embeds and size time ids."""

from __future__ import annotations

from sdexport.specs.families.base import VAE_COMPONENTS, CallDefaults, Detection, Family, TextEncoder
from sdexport.specs.ranges import ShapeRanges

SDXL_CALL_DEFAULTS = {
    "txt2img": CallDefaults(5.0),
    "img2img": CallDefaults(5.0, 0.3),
    "inpaint": CallDefaults(7.5, 0.9999),
}
SDXL_RANGES = ShapeRanges(batch=(1, 1, 4), height=(512, 1024, 1536), width=(512, 1024, 1536))
SDXL_VAE_FP32 = frozenset(VAE_COMPONENTS)
"""The SDXL VAE overflows in fp16."""
OPEN_CLIP_G = TextEncoder("text_encoder_2", clip_layer_offset=2, final_norm=False, pooled=True, pad_token="!")

FAMILY = Family(
    name="sdxl",
    description="SDXL base and inpainting (CLIP ViT-L + OpenCLIP ViT-bigG)",
    text_encoders=(TextEncoder("text_encoder", clip_layer_offset=2, final_norm=False), OPEN_CLIP_G),
    detection=Detection(addition_embed_type="text_time", has_text_encoder=True),
    pipelines={
        "txt2img": "StableDiffusionXLPipeline",
        "img2img": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
    },
    call_defaults=SDXL_CALL_DEFAULTS,
    default_ranges=SDXL_RANGES,
    conditioner="clip_time_ids",
    time_ids="size",
    fp32_components=SDXL_VAE_FP32,
)
