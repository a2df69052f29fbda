"""Custom attention processors for the tests: one that changes the math, two that cannot be traced."""

from __future__ import annotations

from typing import Any

import torch


class TemperatureProcessor:
    """Cross/self attention with the scores divided by a temperature (1.0 is diffusers' AttnProcessor math)."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        scores = torch.matmul(query, key.transpose(-1, -2)) * (attn.scale / self.temperature)
        out = attn.batch_to_head_dim(torch.matmul(scores.softmax(dim=-1), value))
        return attn.to_out[1](attn.to_out[0](out))


class SdpaProcessor(TemperatureProcessor):
    """Temperature attention written with scaled_dot_product_attention (a custom caller of the patched function)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        split = [attn.head_to_batch_dim(p(x), out_dim=4) for p, x in ((attn.to_q, hidden_states),
                                                                        (attn.to_k, context), (attn.to_v, context))]
        out = torch.nn.functional.scaled_dot_product_attention(*split, scale=attn.scale / self.temperature)
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(out.flatten(0, 1))))


class BranchingProcessor(TemperatureProcessor):
    """Untraceable: picks a temperature from the data (``if hidden_states.mean() > 0``)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if hidden_states.mean() > 0:
            return super().__call__(attn, hidden_states, *args, **kwargs)
        return TemperatureProcessor(2.0)(attn, hidden_states, *args, **kwargs)


class ItemProcessor(TemperatureProcessor):
    """Untraceable: reads a tensor value into Python (``.item()``) to scale its output."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        gain = 1.0 + abs(hidden_states.std().item())
        return super().__call__(attn, hidden_states, *args, **kwargs) * gain


def set_cross_attention(unet: Any, processor: Any) -> None:
    """``processor`` on every cross-attention layer (attn2) of ``unet``, the others unchanged."""
    unet.set_attn_processor({name: processor if name.endswith("attn2.processor") else current
                             for name, current in unet.attn_processors.items()})
