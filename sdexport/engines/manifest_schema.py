"""The one schema a compiled folder's manifest.json must satisfy; a wrong key is reported by its path."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdexport.errors import ArtifactError

NUMBER = (int, float)


@dataclass(frozen=True)
class ListOf:
    """A JSON list whose items all match ``item``."""

    item: Any


@dataclass(frozen=True)
class MapOf:
    """A JSON object with any keys whose values all match ``value``."""

    value: Any


# Keys ending in "?" may be absent. A type (or tuple of types) is a leaf; a dict is a JSON object with those keys.
_TENSOR = {"name": str, "dtype": str, "dims": ListOf((int, str))}
_TOLERANCE = {"atol": NUMBER, "rtol": NUMBER}
_COMPONENT_SPEC = {
    "name": str, "inputs": ListOf(_TENSOR), "outputs": ListOf(_TENSOR), "cfg_batched": bool,
    "tolerance_fp32": _TOLERANCE, "tolerance_fp16": _TOLERANCE, "fp16_by_default": bool,
}
_PROFILE = MapOf({"min": ListOf(int), "opt": ListOf(int), "max": ListOf(int)})
_VALIDATION = {"shapes": ListOf({"outputs": MapOf({"max_abs_diff": NUMBER})})}
MANIFEST_SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "sdexport_version": str,
    "backend": str,
    "source": {"kind": str, "id": str, "hash": str, "ip_adapter?": {"path": str, "sha256": str}},
    "model": {
        "family": str, "inpaint": bool, "components": MapOf(_COMPONENT_SPEC), "vae_scale_factor": int,
        "scaling_factor": NUMBER, "clip_skip_max": int, "time_ids_dim": (int, type(None)), "pipeline_config?": dict,
    },
    "shape_ranges": {"batch": ListOf(int), "height": ListOf(int), "width": ListOf(int), "prompt_chunks": int},
    "shape_ranges_origin?": str,
    "files": MapOf({"size": int, "sha256": str}),
    "components": MapOf({
        "graph": str, "profile": _PROFILE, "precision?": str, "validation": _VALIDATION, "weight_map?": str,
        "attention_processors?": MapOf({"class": str, "export": str}),
        "openvino_quantized?": {"graph": str, "method": str, "source_sha256": str, "samples": int},
    }),
    "tokenizers?": ListOf(str),
    "scheduler_config?": str,
    "loras?": ListOf({"name": str, "weight": NUMBER, "components?": ListOf(str)}),
    "controlnets?": ListOf({"component": str, "source": str, "hash": str, "conditioning_scale": NUMBER}),
}


def _type_name(expected: Any) -> str:
    if isinstance(expected, ListOf):
        return "a list"
    if isinstance(expected, MapOf | dict):
        return "an object"
    types = expected if isinstance(expected, tuple) else (expected,)
    names = {str: "string", int: "integer", float: "number", bool: "true/false", dict: "object",
             type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _leaf_ok(value: Any, expected: Any) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _check(value: Any, expected: Any, where: str) -> None:
    """Raise ValueError(key path, message) at the first mismatch under ``where``."""
    if isinstance(expected, dict):
        if not isinstance(value, dict):
            raise ValueError(where, f"must be an object, not {type(value).__name__}")
        for key, sub in expected.items():
            name = key.rstrip("?")
            path = f"{where}.{name}" if where else name
            if name not in value:
                if key.endswith("?"):
                    continue
                raise ValueError(path, "is missing")
            _check(value[name], sub, path)
    elif isinstance(expected, ListOf):
        if not isinstance(value, list):
            raise ValueError(where, f"must be a list, not {type(value).__name__}")
        for i, item in enumerate(value):
            _check(item, expected.item, f"{where}[{i}]")
    elif isinstance(expected, MapOf):
        if not isinstance(value, dict):
            raise ValueError(where, f"must be an object, not {type(value).__name__}")
        for key, item in value.items():
            _check(item, expected.value, f"{where}.{key}")
    elif not _leaf_ok(value, expected):
        raise ValueError(where, f"must be {_type_name(expected)}, not {value!r:.60}")


def validate_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """Check ``manifest`` against MANIFEST_SCHEMA; raise ArtifactError naming the first wrong key path."""
    try:
        _check(manifest, MANIFEST_SCHEMA, "")
    except ValueError as exc:
        where, message = exc.args
        key = f"key {where!r}" if where else "the manifest"
        raise ArtifactError(f"{path}: {key} {message}; rebuild the folder") from None
    components: Mapping[str, Any] = manifest["components"]
    for name, spec in manifest["model"]["components"].items():
        if name not in components:
            raise ArtifactError(f"{path}: key 'components.{name}' is missing; rebuild the folder")
        _check_profile(path, name, spec, components[name]["profile"])
    return manifest


def _check_profile(path: Path, name: str, spec: Mapping[str, Any], profile: Mapping[str, Any]) -> None:
    """Every input of the component has min / opt / max shapes of its rank in the profile."""
    for tensor in spec["inputs"]:
        where = f"components.{name}.profile.{tensor['name']}"
        if tensor["name"] not in profile:
            raise ArtifactError(f"{path}: key {where!r} is missing; rebuild the folder")
        for key, shape in profile[tensor["name"]].items():
            if len(shape) != len(tensor["dims"]):
                raise ArtifactError(f"{path}: key '{where}.{key}' has {len(shape)} dims, the input has "
                                    f"{len(tensor['dims'])}; rebuild the folder")
