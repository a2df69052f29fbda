"""Model families as data: tensor, component and model specs, shape ranges and the profiles derived from them."""

from sdexport.specs.model import (
    COMPONENT_ORDER,
    ComponentSpec,
    ModelSpec,
    ShapeRanges,
    TensorSpec,
    model_spec,
)
from sdexport.specs.presets import FAMILY_PRESETS, PRESETS, TINY_PRESETS, Preset, resolve_preset

__all__ = [
    "COMPONENT_ORDER",
    "ComponentSpec",
    "FAMILY_PRESETS",
    "ModelSpec",
    "PRESETS",
    "Preset",
    "ShapeRanges",
    "TINY_PRESETS",
    "TensorSpec",
    "model_spec",
    "resolve_preset",
]
