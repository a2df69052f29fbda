"""The plan phase of `sdexport build`: the config checked, the backend chosen, precisions and keys decided.

Each component is keyed by everything its graph depends on; a finished component leaves a record in
``.build/<component>.json`` so an interrupted build resumes there, and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdexport import __version__
from sdexport.engines import Backend, artifacts, get_backend
from sdexport.errors import ArtifactError
from sdexport.export.controlnet import ControlNetSource, ControlNetSpec, controlnet_keys, inspect_controlnets
from sdexport.export.load import SourceInfo, inspect_source
from sdexport.export.lora import LORA_TARGETS, LoraSpec
from sdexport.export.memory import parse_size
from sdexport.specs import ShapeRanges
from sdexport.specs.presets import source_ranges

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")


@dataclass
class BuildConfig:
    """Everything `sdexport build` takes.

    ``backend_options``: the backend's build options, as its options object (``TrtOptions``) or a mapping of the
    option names it declares (``Backend.build_options``) to values; None for its defaults.
    """

    model: Any
    """A preset, hub id or diffusers folder; or an in-memory diffusers pipeline (or a dict of its parts)."""
    out: Path
    loras: list[LoraSpec] = field(default_factory=list)
    precision: str = "fp32"
    component_precision: dict[str, str] = field(default_factory=dict)
    ranges: ShapeRanges | Mapping[str, Any] | None = None
    """All ranges, or a mapping of some (batch / height / width / prompt_chunks) over the defaults."""
    random_weights: bool = False
    allow_pickle: bool = False
    backend: str = "onnxruntime"
    backend_options: Any = None
    ip_adapter: Path | None = None
    """An IP-Adapter (diffusers' load_ip_adapter layout): image encoder graph, adapter inside the UNet graph."""
    memory_budget: int | str | None = None
    """Bytes (or "2GiB") the trace and validation may use; default: MemAvailable (``sdexport.export.memory``)."""
    controlnets: list[ControlNetSpec] = field(default_factory=list)
    """ControlNets (``PATH_OR_HUB_ID[:SCALE]`` parsed), each exported as its own graph."""


@dataclass
class BuildPlan:
    """What one build does, decided before any export work; the later phases fill ``records`` and ``seconds``."""

    config: BuildConfig
    folder: Path
    info: SourceInfo
    backend: Backend
    backend_options: Any
    ranges: ShapeRanges
    ranges_origin: str
    loras: list[dict[str, Any]]
    precisions: dict[str, str]
    keys: dict[str, str]
    records: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    todo: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    controlnets: list[ControlNetSource] = field(default_factory=list)

    @property
    def reused(self) -> list[str]:
        """The components whose finished graphs are kept as they are."""
        return [n for n in self.precisions if n not in self.todo]

    @property
    def build_key(self) -> str:
        """The key of the whole folder: every component key and the LoRAs."""
        data: dict[str, Any] = {"keys": self.keys, "loras": [(r["sha256"], r["weight"]) for r in self.loras]}
        if self.controlnets:
            data["controlnets"] = [(c.fingerprint, c.spec.scale) for c in self.controlnets]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _precision_of(config: BuildConfig, info: SourceInfo, name: str) -> str:
    if name in config.component_precision:
        return config.component_precision[name]
    component = info.spec.components[name]
    if config.precision == "fp16" and not component.fp16_by_default:
        return "fp32"
    return config.precision


def _check_config(config: BuildConfig, info: SourceInfo) -> None:
    if config.memory_budget is not None:
        parse_size(config.memory_budget)
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision {config.precision!r} is not one of {PRECISIONS}")
    for name, precision in config.component_precision.items():
        if name not in info.spec.components:
            raise ValueError(f"--component-precision names {name!r}; this model has {list(info.spec.components)}")
        if precision not in PRECISIONS:
            raise ValueError(f"--component-precision {name}={precision!r}: choose one of {PRECISIONS}")


# Bumped when the exported graphs change for the same source and settings (2: constant-scale attention, fused
# ONNX Runtime graph beside the portable one; 3: every graph's weights in a data file); part of every component's
# key, so older builds are redone.
EXPORT_FORMAT = 3


def _component_key(info: SourceInfo, name: str, precision: str, ranges: ShapeRanges, loras: list[dict]) -> str:
    data = {
        "sdexport": __version__,
        "format": EXPORT_FORMAT,
        "source": info.fingerprint,
        "component": info.spec.components[name].to_dict(),
        "precision": precision,
        "ranges": ranges.to_dict(),
        "loras": [(r["sha256"], r["weight"]) for r in loras] if name in LORA_TARGETS else [],
    }
    adapters = {k: r["sha256"] for k, r in info.adapters.items() if name in r["components"]}
    if adapters:
        data["adapters"] = adapters
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def plan_build(config: BuildConfig) -> BuildPlan:
    """Resolve the source, check every option and the backend (its preflight too), and key each component."""
    backend = get_backend(config.backend)
    info = inspect_source(config.model, config.random_weights)
    if config.ip_adapter is not None:
        if config.controlnets:
            raise ValueError(f"ip_adapter={str(config.ip_adapter)!r} with controlnets: one build takes an IP-Adapter "
                             "or ControlNets, not both yet; build two folders")
        from sdexport.export.ip_adapter import attach

        info = attach(info, config.ip_adapter, config.allow_pickle)
    info, controlnets = inspect_controlnets(info, config.controlnets)
    _check_config(config, info)
    ranges, origin = _ranges(config, info)
    loras = []
    for lora in config.loras:
        lora.check(config.allow_pickle)
        loras.append(lora.record())
    options = backend.build_config(config.backend_options)
    backend.check_machine(options)  # e.g. no GPU for TensorRT here: say so now, not after the export
    precisions = {name: _precision_of(config, info, name) for name in info.spec.components}
    keys = {name: _component_key(info, name, p, ranges, loras) for name, p in precisions.items()}
    return BuildPlan(config, Path(config.out), info, backend, options, ranges, origin, loras, precisions,
                     controlnet_keys(keys, controlnets), controlnets=controlnets)


def _ranges(config: BuildConfig, info: SourceInfo) -> tuple[ShapeRanges, str]:
    """The build's shape ranges (given, the preset's, or from the model's configs), checked, and why."""
    if isinstance(config.ranges, ShapeRanges):
        ranges, origin = config.ranges, "given"
    else:
        ranges, origin = source_ranges(info.preset, info.spec.family, info.configs, config.ranges)
    ranges.validate(info.spec.vae_scale_factor)
    log.info("shape ranges %s: %s", ranges.to_dict(), origin)
    return ranges, origin


def _read_record(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / artifacts.BUILD_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _reusable(folder: Path, record: dict[str, Any] | None, key: str) -> bool:
    if not record or record.get("key") != key:
        return False
    try:
        artifacts.verify_files(folder, record["files"], hashes=True)
    except ArtifactError as exc:
        log.info("rebuilding: %s", exc)
        return False
    return True


def schedule(plan: BuildPlan) -> None:
    """Read the folder's component records (under the build lock) and list the components to rebuild."""
    plan.records = {name: _read_record(plan.folder, name) for name in plan.precisions}
    plan.todo = [n for n in plan.precisions if not _reusable(plan.folder, plan.records[n], plan.keys[n])]


def up_to_date_manifest(plan: BuildPlan) -> dict[str, Any] | None:
    """The folder's manifest when nothing needs doing (no component to rebuild, same key, nothing to compile)."""
    if plan.todo or not (plan.folder / artifacts.MANIFEST).is_file():
        return None
    try:
        manifest = artifacts.load_manifest(plan.folder)
    except ArtifactError as exc:
        log.info("rewriting the manifest: %s", exc)
        return None
    return manifest if manifest.get("build_key") == plan.build_key and not plan.backend.compiles else None
