"""Stable Diffusion 2.x: SD 1.x's pipelines over an OpenCLIP-H text encoder (gelu, pads with "!").

diffusers runs SD 2.x through the SD 1.x pipeline classes: the encoder's last hidden state through the final layer
norm, clip_skip counted the same way (the released config already drops OpenCLIP's last layer, so "last" is
OpenCLIP's penultimate). What differs lives in the configs: the v-prediction scheduler of the 768 model, the UNet's
``upcast_attention`` / ``use_linear_projection`` / per-block ``attention_head_dim``, and the 1024-wide encoder.
"""

from __future__ import annotations

from sdexport.specs.families.base import Detection, Family, TextEncoder
from sdexport.specs.families.sd import SD_CALL_DEFAULTS, SD_PIPELINES
from sdexport.specs.ranges import ShapeRanges

FAMILY = Family(
    name="sd2",
    description="Stable Diffusion 2.x (OpenCLIP ViT-H text encoder)",
    text_encoders=(TextEncoder("text_encoder", clip_layer_offset=1, final_norm=True, pad_token="!"),),
    detection=Detection(addition_embed_type=None, text_encoder_act="gelu"),
    pipelines=SD_PIPELINES,
    call_defaults=SD_CALL_DEFAULTS,
    default_ranges=ShapeRanges(batch=(1, 1, 4), height=(256, 768, 1024), width=(256, 768, 1024)),
)
