"""ControlNet as data: its component spec, the residual inputs it adds to the UNet, and the family checks.

A ControlNet mirrors the UNet's down half: it returns one residual per down-block output (the conv_in output, every
resnet of every down block, every downsampler) plus the mid-block output. The UNet of a ControlNet folder takes
those residuals as inputs. Residual ``i`` at UNet level ``k`` has the latent sides divided by 2**k, rounded up
(``latent_height/2**k``, see ``sdexport.specs.model.DERIVED``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from sdexport.specs.families import detect_family, family
from sdexport.specs.model import ComponentSpec, ModelSpec, TensorSpec

CONTROLNET_PIPELINES = {
    "sd": "StableDiffusionControlNetPipeline",
    "sd2": "StableDiffusionControlNetPipeline",
    "sdxl": "StableDiffusionXLControlNetPipeline",
}
"""The diffusers pipeline that defines ControlNet generation, per family that has ControlNets."""
CONTROLNET_PREFIX = "controlnet_"
DOWN_OUTPUT = "down_block_res_sample_{}"
MID_OUTPUT = "mid_block_res_sample"
DOWN_INPUT = "down_block_additional_residual_{}"
MID_INPUT = "mid_block_additional_residual"
SCALE_INPUT = "conditioning_scale"
COND_INPUT = "controlnet_cond"
# Config keys a ControlNet must share with the UNet for its residuals to fit the UNet's skip connections.
_MATCHING_KEYS = ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels",
                  "addition_embed_type", "projection_class_embeddings_input_dim", "addition_time_embed_dim")


def controlnet_name(index: int) -> str:
    """The component name of the ``index``-th ControlNet."""
    return f"{CONTROLNET_PREFIX}{index}"


def _level_dims(level: int) -> tuple[str, str]:
    if level == 0:
        return "latent_height", "latent_width"
    return f"latent_height/{2 ** level}", f"latent_width/{2 ** level}"


def residual_tensors(config: Mapping[str, Any], name: str) -> list[TensorSpec]:
    """The down residuals then the mid residual of a UNet / ControlNet config, named by ``name`` ("down"/"mid")."""
    channels = list(config["block_out_channels"])
    per_block = config.get("layers_per_block", 2)
    layers = list(per_block) if isinstance(per_block, Sequence) else [int(per_block)] * len(channels)
    shapes = [(channels[0], 0)]
    for block, width in enumerate(channels):
        shapes += [(width, block)] * int(layers[block])
        if block < len(channels) - 1:
            shapes.append((width, block + 1))
    down, mid = (DOWN_OUTPUT, MID_OUTPUT) if name == "outputs" else (DOWN_INPUT, MID_INPUT)
    tensors = [TensorSpec(down.format(i), "float32", ("batch", width, *_level_dims(level)))
               for i, (width, level) in enumerate(shapes)]
    tensors.append(TensorSpec(mid, "float32", ("batch", channels[-1], *_level_dims(len(channels) - 1))))
    return tensors


def controlnet_family(config: Mapping[str, Any], text_configs: Mapping[str, Mapping[str, Any]]) -> str:
    """The family a ControlNet was trained for, from its config (read like a UNet's) and the model's encoders."""
    try:
        return detect_family(config, text_configs)
    except ValueError as exc:
        raise ValueError(f"cannot tell which model family this ControlNet is for: {exc}") from None


def check_controlnet(label: str, config: Mapping[str, Any], spec: ModelSpec, unet_config: Mapping[str, Any],
                     text_configs: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise ValueError naming both families (or the differing config key) when ``label`` does not fit the model."""
    if spec.family not in CONTROLNET_PIPELINES:
        raise ValueError(f"ControlNet {label}: {spec.family} models ({spec.family_record.description}) have no "
                         f"ControlNet pipeline; ControlNets run on {', '.join(sorted(CONTROLNET_PIPELINES))}")
    if spec.inpaint:
        raise ValueError(f"ControlNet {label}: the model is an inpainting model (9-channel UNet); ControlNets run "
                         "on text-to-image models")
    own = controlnet_family(config, text_configs)
    if own != spec.family:
        raise ValueError(f"ControlNet {label} is for {own} ({family(own).description}), the model is "
                         f"{spec.family} ({spec.family_record.description}): use a ControlNet trained for "
                         f"{spec.family}")
    for key in _MATCHING_KEYS:
        if config.get(key) != unet_config.get(key):
            raise ValueError(f"ControlNet {label} has {key}={config.get(key)!r}, the model's UNet "
                             f"{unet_config.get(key)!r}: its residuals do not fit this UNet")
    embedding = config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
    if 2 ** (len(embedding) - 1) != spec.vae_scale_factor:
        raise ValueError(f"ControlNet {label} downsamples its image by {2 ** (len(embedding) - 1)} "
                         f"(conditioning_embedding_out_channels={list(embedding)}), the model's VAE by "
                         f"{spec.vae_scale_factor}")


def controlnet_component(spec: ModelSpec, config: Mapping[str, Any], index: int) -> ComponentSpec:
    """The spec of one ControlNet: the UNet's inputs (without residuals), the control image and per-row scales.

    ``conditioning_scale`` is [batch, residuals]: every residual of a row is multiplied by its own scale (all equal
    normally, 0.1 .. 1.0 in guess mode), so one graph serves every mode.
    """
    unet = spec.components["unet"]
    outputs = residual_tensors(config, "outputs")
    inputs = [*unet.inputs[:5 if spec.family_record.added_conditions else 3],
              TensorSpec(COND_INPUT, "float32", ("batch", 3, "image_height", "image_width")),
              TensorSpec(SCALE_INPUT, "float32", ("batch", len(outputs)))]
    name = controlnet_name(index)
    return ComponentSpec(name=name, inputs=tuple(inputs), outputs=tuple(outputs), cfg_batched=True,
                         tolerance_fp32=unet.tolerance_fp32, tolerance_fp16=unet.tolerance_fp16,
                         fp16_by_default=name not in spec.family_record.fp32_components)


def with_controlnets(spec: ModelSpec, unet_config: Mapping[str, Any],
                     configs: Sequence[Mapping[str, Any]]) -> ModelSpec:
    """``spec`` with one component per ControlNet and a UNet that takes their summed residuals as inputs."""
    if not configs:
        return spec
    unet = spec.components["unet"]
    residuals = residual_tensors(unet_config, "inputs")
    components = dict(spec.components)
    components["unet"] = replace(unet, inputs=(*unet.inputs, *residuals))
    for index, config in enumerate(configs):
        components[controlnet_name(index)] = controlnet_component(spec, config, index)
    return replace(spec, components=components)


def controlnet_components(spec: ModelSpec) -> list[str]:
    """The ControlNet component names of a spec, in order (empty for a folder without ControlNets)."""
    return [n for n in spec.components if n.startswith(CONTROLNET_PREFIX)]
