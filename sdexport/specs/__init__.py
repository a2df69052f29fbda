"""Model families as data: tensor, component and model specs, shape ranges and the profiles derived from them."""

from sdexport.specs.families import Family, detect_family, families, family, register_family
from sdexport.specs.model import (
    COMPONENT_ORDER,
    ComponentSpec,
    ModelSpec,
    TensorSpec,
    model_spec,
)
from sdexport.specs.presets import FAMILY_PRESETS, PRESETS, SHIPPED_PRESETS, TINY_PRESETS, Preset, resolve_preset
from sdexport.specs.ranges import ShapeRanges

__all__ = [
    "COMPONENT_ORDER",
    "ComponentSpec",
    "FAMILY_PRESETS",
    "Family",
    "ModelSpec",
    "PRESETS",
    "Preset",
    "ShapeRanges",
    "SHIPPED_PRESETS",
    "TINY_PRESETS",
    "TensorSpec",
    "detect_family",
    "families",
    "family",
    "model_spec",
    "register_family",
    "resolve_preset",
]
