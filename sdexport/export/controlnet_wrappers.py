"""Export wrappers of a ControlNet folder: each ControlNet (residuals scaled per row) and the UNet taking residuals."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sdexport.specs import ComponentSpec, ModelSpec
from sdexport.specs.controlnet import CONTROLNET_PREFIX, DOWN_INPUT, MID_INPUT


class ControlNetWrapper(nn.Module):
    """ControlNet with positional inputs -> (down residuals..., mid residual), residual j of row b times scale[b, j].

    The model runs at conditioning scale 1.0 (an exact no-op), so plain, multi-ControlNet and guess-mode scaling
    (diffusers' per-residual ``logspace(-1, 0)`` factors) are all one input, computed by the runtime.
    """

    def __init__(self, controlnet: nn.Module, added_cond: bool) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.added_cond = added_cond

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs: dict[str, Any] = {}
        if self.added_cond:
            kwargs["added_cond_kwargs"] = {"text_embeds": rest[0], "time_ids": rest[1]}
        cond, scale = rest[-2], rest[-1]
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond=cond,
                                    conditioning_scale=1.0, return_dict=False, **kwargs)
        outs = [*down, mid]
        return tuple(out * scale[:, j, None, None, None] for j, out in enumerate(outs))


def controlnet_wrapper(pipe: Any, spec: ModelSpec, component: ComponentSpec) -> nn.Module | None:
    """The wrapper of a ControlNet folder's ControlNet or residual UNet component, or None for any other."""
    added = spec.family_record.added_conditions
    if component.name.startswith(CONTROLNET_PREFIX):
        module = getattr(pipe, component.name, None)
        if module is None:
            raise ValueError(f"the source pipeline has no {component.name} loaded")
        return ControlNetWrapper(module, added).eval()
    if component.name == "unet" and component.inputs[-1].name == MID_INPUT:
        from sdexport.export.wrappers import UNetWrapper

        residuals = 1 + sum(t.name.startswith(DOWN_INPUT.format("")) for t in component.inputs)
        return UNetWrapper(pipe.unet, added, residuals).eval()
    return None
