"""The family registry: family name (as stored in manifests) -> its record; detection from configs."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import import_module
from typing import Any

from sdexport.specs.families.base import TASKS, CallDefaults, Detection, Family, TextEncoder

# One line per family: the module in this package that defines its FAMILY record.
FAMILY_MODULES = ("sd", "sd2", "sdxl", "sdxl_refiner")

_REGISTRY: dict[str, Family] = {}


def register_family(record: Family) -> Family:
    """Add a family record; its name must be new, and no registered family may claim the same configs."""
    if record.name in _REGISTRY:
        raise ValueError(f"family {record.name!r} is already registered")
    clash = [f.name for f in _REGISTRY.values() if f.detection == record.detection]
    if clash:
        raise ValueError(f"family {record.name!r} is detected like {clash[0]!r}: give it its own Detection")
    _REGISTRY[record.name] = record
    return record


def unregister_family(name: str) -> None:
    """Remove a family (tests that register their own)."""
    family(name)
    del _REGISTRY[name]


def family(name: str) -> Family:
    """The record of the family called ``name``; ValueError listing the known families otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(_REGISTRY)}") from None


def families() -> dict[str, Family]:
    """Every registered family by name, in registration order."""
    return dict(_REGISTRY)


def detect_family(unet_config: Mapping[str, Any], text_configs: Mapping[str, Mapping[str, Any]]) -> str:
    """The family of a pipeline from its UNet and text encoder configs, never from a name."""
    matches = [f.name for f in _REGISTRY.values() if f.detection.matches(unet_config, text_configs)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"the configs match several families {matches}; their Detection records overlap")
    kind = unet_config.get("addition_embed_type")
    supported = sorted({str(f.detection.addition_embed_type) for f in _REGISTRY.values()})
    if all(f.detection.addition_embed_type != kind for f in _REGISTRY.values()):
        raise ValueError(f"unsupported UNet addition_embed_type={kind!r}; supported: {', '.join(supported)} "
                         f"(families {', '.join(_REGISTRY)})")
    act = text_configs.get("text_encoder", {}).get("hidden_act")
    raise ValueError(f"no family matches UNet addition_embed_type={kind!r} with text encoders {sorted(text_configs)} "
                     f"(text_encoder hidden_act={act!r}); known families: {', '.join(_REGISTRY)}")


for _module in FAMILY_MODULES:
    register_family(import_module(f"{__name__}.{_module}").FAMILY)

__all__ = [
    "TASKS",
    "CallDefaults",
    "Detection",
    "Family",
    "TextEncoder",
    "detect_family",
    "families",
    "family",
    "register_family",
    "unregister_family",
]
