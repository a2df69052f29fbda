"""SDXL refiner: OpenCLIP ViT-bigG only, aesthetic-score time ids; refines images (no text-to-image)."""

from __future__ import annotations

from sdexport.specs.families.base import Detection, Family
from sdexport.specs.families.sdxl import OPEN_CLIP_G, SDXL_CALL_DEFAULTS, SDXL_RANGES, SDXL_VAE_FP32

FAMILY = Family(
    name="sdxl-refiner",
    description="SDXL refiner (OpenCLIP ViT-bigG; image-to-image and inpainting only)",
    text_encoders=(OPEN_CLIP_G,),
    detection=Detection(addition_embed_type="text_time", has_text_encoder=False),
    pipelines={"img2img": "StableDiffusionXLImg2ImgPipeline", "inpaint": "StableDiffusionXLInpaintPipeline"},
    call_defaults={task: SDXL_CALL_DEFAULTS[task] for task in ("img2img", "inpaint")},
    default_ranges=SDXL_RANGES,
    conditioner="clip_time_ids",
    time_ids="aesthetic",
    fp32_components=SDXL_VAE_FP32,
    task_hint="a refiner folder refines images: pass image= (a picture, or the base's latents from "
              "output_type='latent')",
)
