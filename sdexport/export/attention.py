"""Attention as traced for export: explicit MatMul -> Mul(constant scale) -> Softmax -> MatMul.

diffusers' attention processors call ``torch.nn.functional.scaled_dot_product_attention``, which the ONNX exporter
writes with a scale computed at run time (``Sqrt(Cast(Shape))`` feeding a ``Mul`` on Q and another on K). That
hides the attention from ONNX Runtime's fusions (MatMul-scale, MultiHeadAttention) and from TensorRT's MHA
pattern. While exporting, this module routes those calls through the plain pattern with the scale as a constant;
the weights, their names and every other op stay as they are.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional

from sdexport.export.processors import traced_as_is

log = logging.getLogger(__name__)

# Components whose attention is exported in the constant-scale form (their modules are diffusers models).
CONSTANT_SCALE_COMPONENTS = ("unet", "vae_encoder", "vae_decoder")


def explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(query @ key^T * scale) @ value on (batch, heads, sequence, head_dim) tensors."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    return torch.matmul(scores.softmax(dim=-1), value)


def _constant_scale_sdpa(original: Any) -> Any:
    """A drop-in ``scaled_dot_product_attention`` that takes the explicit path where it is equivalent (never inside
    a custom attention processor, which is traced as written)."""

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, **kwargs: Any
             ) -> torch.Tensor:
        if attn_mask is not None or is_causal or dropout_p or kwargs or traced_as_is():
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        # The head size is fixed per layer: a Python float here is what makes the scale a constant in the graph.
        head_dim = int(query.shape[-1])
        return explicit_attention(query, key, value, scale if scale is not None else 1.0 / math.sqrt(head_dim))

    return sdpa


@contextlib.contextmanager
def constant_scale_attention() -> Iterator[None]:
    """While active, unmasked scaled-dot-product attention is traced as MatMul, constant Mul, Softmax, MatMul."""
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _constant_scale_sdpa(original)
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original
