"""Small nn.Modules with fixed positional inputs and tuple outputs, one per exported component."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sdexport.export.controlnet_wrappers import controlnet_wrapper
from sdexport.specs import ComponentSpec, ModelSpec


class TextEncoderWrapper(nn.Module):
    """CLIP -> hidden_states[batch, clip_skip options, 77, D] (+ projected pooled text_embeds).

    Entry k along axis 1 is what the family feeds the UNet with ``clip_skip=k`` (k=0: no clip skip): SD takes
    hidden state -(1+k) through the final layer norm; SDXL takes hidden state -(2+k) as it is.
    """

    def __init__(self, model: nn.Module, offset: int, final_norm: bool, options: int, pooled: bool) -> None:
        super().__init__()
        self.model = model
        self.offset = offset
        self.final_norm = final_norm
        self.options = options
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids, output_hidden_states=True)
        picked = []
        for k in range(self.options):
            hidden = out.hidden_states[-(self.offset + k)]
            if self.final_norm:
                hidden = getattr(self.model, "text_model", self.model).final_layer_norm(hidden)
            picked.append(hidden)
        stacked = torch.stack(picked, dim=1)
        if self.pooled:
            return stacked, out.text_embeds
        return (stacked,)


class UNetWrapper(nn.Module):
    """UNet with positional inputs; SDXL's added conditions passed as text_embeds and time_ids; the last
    ``residuals`` inputs (a ControlNet folder's) are the down-block residuals, then the mid-block one."""

    def __init__(self, unet: nn.Module, added_cond: bool, residuals: int = 0) -> None:
        super().__init__()
        self.unet = unet
        self.added_cond = added_cond
        self.residuals = residuals

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *added: torch.Tensor) -> tuple[torch.Tensor]:
        kwargs: dict[str, Any] = {}
        if self.added_cond:
            kwargs["added_cond_kwargs"] = {"text_embeds": added[0], "time_ids": added[1]}
        if self.residuals:
            kwargs["down_block_additional_residuals"] = added[-self.residuals:-1]
            kwargs["mid_block_additional_residual"] = added[-1]
        out = self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]
        return (out,)


class VaeEncoderWrapper(nn.Module):
    """image in [-1, 1] -> the latent distribution's moments (mean and log-variance, concatenated on channels)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.encode(image).latent_dist.parameters,)


class VaeDecoderWrapper(nn.Module):
    """latent (already divided by the scaling factor) -> image in about [-1, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.decode(latent, return_dict=False)[0],)


def torch_module(pipe: Any, name: str) -> nn.Module:
    """The diffusers / transformers module that a component is exported from."""
    attr = "vae" if name.startswith("vae") else name
    module = getattr(pipe, attr, None)
    if module is None:
        raise ValueError(f"the source pipeline has no {attr}")
    return module


def wrap(pipe: Any, spec: ModelSpec, component: ComponentSpec) -> nn.Module:
    """The export wrapper of ``component`` around the pipeline's module."""
    from sdexport.export.ip_adapter import wrap_ip_adapter

    controlled = controlnet_wrapper(pipe, spec, component)
    if controlled is not None:
        return controlled
    module = torch_module(pipe, component.name)
    name = component.name
    adapted = wrap_ip_adapter(module, component)
    if adapted is not None:
        return adapted
    if name.startswith("text_encoder"):
        encoder = spec.family_record.encoder(name)
        return TextEncoderWrapper(
            module, encoder.clip_layer_offset, encoder.final_norm, spec.clip_skip_max + 1,
            pooled=len(component.outputs) > 1,
        ).eval()
    if name == "unet":
        return UNetWrapper(module, added_cond=len(component.inputs) > 3).eval()
    if name == "vae_encoder":
        return VaeEncoderWrapper(module).eval()
    if name == "vae_decoder":
        return VaeDecoderWrapper(module).eval()
    raise ValueError(f"unknown component {name!r}")
