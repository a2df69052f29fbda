"""IP-Adapter as data: the image encoder component and the UNet's two extra inputs (image embeds, per-row scale).

The UNet graph takes ``image_embeds`` (the CLIP vision projection, diffusers' ``added_cond_kwargs["image_embeds"]``)
and ``ip_adapter_scale`` (one value per batch row, so the scale is a run-time input, never a constant); the
adapter's image projection and its attention weights are inside the UNet graph.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sdexport.specs.model import _TEXT_TOL, ComponentSpec, ModelSpec, TensorSpec

IMAGE_ENCODER = "image_encoder"
IMAGE_EMBEDS = "image_embeds"
SCALE = "ip_adapter_scale"


@dataclass(frozen=True)
class IpAdapterShape:
    """What the graphs need to know of an IP-Adapter: image size, embedding width, image tokens, cross dim."""

    image_size: int
    image_embed_dim: int
    num_tokens: int
    cross_attention_dim: int


def image_encoder_spec(shape: IpAdapterShape) -> ComponentSpec:
    """CLIP vision encoder with projection: pixel_values [batch, 3, S, S] -> image_embeds [batch, D]."""
    size = shape.image_size
    return ComponentSpec(
        name=IMAGE_ENCODER,
        inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, size, size)),),
        outputs=(TensorSpec(IMAGE_EMBEDS, "float32", ("batch", shape.image_embed_dim)),),
        cfg_batched=False,
        tolerance_fp32=_TEXT_TOL[0],
        tolerance_fp16=_TEXT_TOL[1],
    )


def with_ip_adapter(spec: ModelSpec, shape: IpAdapterShape) -> ModelSpec:
    """``spec`` with the image encoder component and the UNet's image_embeds / ip_adapter_scale inputs."""
    unet = spec.components["unet"]
    cross = int(unet.inputs[2].dims[2])
    if shape.cross_attention_dim != cross:
        raise ValueError(f"the IP-Adapter projects to {shape.cross_attention_dim} features but this {spec.family} "
                         f"UNet cross-attends to {cross}: it was made for another model family")
    if any(t.name == IMAGE_EMBEDS for t in unet.inputs):
        raise ValueError("the UNet already takes image_embeds: one IP-Adapter per build")
    unet = replace(unet, inputs=(*unet.inputs, TensorSpec(IMAGE_EMBEDS, "float32", ("batch", shape.image_embed_dim)),
                                 TensorSpec(SCALE, "float32", ("batch",))))
    components = {n: c for n, c in spec.components.items() if n != "unet"}
    components[IMAGE_ENCODER] = image_encoder_spec(shape)
    components["unet"] = unet
    return replace(spec, components=components)


def has_ip_adapter(spec: ModelSpec) -> bool:
    """Whether a folder's UNet takes an IP-Adapter's image embeds."""
    return any(t.name == IMAGE_EMBEDS for t in spec.components["unet"].inputs)
