"""Stable Diffusion 1.x: one OpenAI CLIP encoder read at its last layer through the final norm, no added inputs."""

from __future__ import annotations

from sdexport.specs.families.base import CallDefaults, Detection, Family, TextEncoder
from sdexport.specs.ranges import ShapeRanges

SD_PIPELINES = {
    "txt2img": "StableDiffusionPipeline",
    "img2img": "StableDiffusionImg2ImgPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
}
"""The diffusers pipelines of SD 1.x and 2.x (the same classes)."""
SD_CALL_DEFAULTS = {
    "txt2img": CallDefaults(7.5),
    "img2img": CallDefaults(7.5, 0.8),
    "inpaint": CallDefaults(7.5, 1.0),
}
SD_RANGES = ShapeRanges(batch=(1, 1, 4), height=(256, 512, 1024), width=(256, 512, 1024))

FAMILY = Family(
    name="sd",
    description="Stable Diffusion 1.x (OpenAI CLIP ViT-L text encoder)",
    text_encoders=(TextEncoder("text_encoder", clip_layer_offset=1, final_norm=True),),
    detection=Detection(addition_embed_type=None, text_encoder_act="quick_gelu"),
    pipelines=SD_PIPELINES,
    call_defaults=SD_CALL_DEFAULTS,
    default_ranges=SD_RANGES,
)
