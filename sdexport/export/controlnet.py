"""ControlNet sources for `sdexport build --controlnet PATH_OR_HUB_ID[:SCALE]`: parse, inspect, check, load, record.

Each ControlNet becomes its own graph (``controlnet_<i>``) and the UNet graph takes their summed residuals as inputs
(``sdexport.specs.controlnet``); the manifest lists them under ``controlnets`` with their default scale.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdexport.errors import SourceError
from sdexport.export.load import SourceInfo, _check_weights, _hub_folder, _read_json, folder_fingerprint
from sdexport.export.lora import split_weight
from sdexport.specs import ModelSpec
from sdexport.specs.controlnet import (
    CONTROLNET_PIPELINES,
    check_controlnet,
    controlnet_components,
    controlnet_name,
    with_controlnets,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlNetSpec:
    """A ControlNet (a local diffusers ControlNet folder or a hub id) and its default conditioning scale."""

    source: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> ControlNetSpec:
        """Parse ``PATH_OR_HUB_ID[:SCALE]`` (the scale defaults to 1.0, diffusers' default)."""
        return cls(*split_weight(text, 1.0))


@dataclass(frozen=True)
class ControlNetSource:
    """An inspected ControlNet: where its files are, its config and fingerprint, and its component name."""

    spec: ControlNetSpec
    component: str
    folder: Path
    config: dict[str, Any]
    fingerprint: str

    def record(self) -> dict[str, Any]:
        """The manifest entry of this ControlNet."""
        return {"component": self.component, "source": self.spec.source, "path": str(self.folder),
                "hash": self.fingerprint, "conditioning_scale": self.spec.scale}


def _folder_of(source: str) -> Path:
    """The local folder of a ControlNet given as a path or a hub id."""
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise SourceError(f"ControlNet folder {path} has no config.json; pass a diffusers ControlNet folder "
                              "(ControlNetModel.save_pretrained) or a hub id owner/name")
        return path.resolve()
    if source.count("/") != 1:
        raise SourceError(f"ControlNet {source!r} is neither an existing folder nor a hub id of the form owner/name")
    return _hub_folder(source)


def _inspect_one(spec: ControlNetSpec, index: int, info: SourceInfo) -> ControlNetSource:
    folder = _folder_of(spec.source)
    config = _read_json(folder / "config.json")
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise SourceError(f"ControlNet {spec.source}: {config['_class_name']} is not supported; "
                          "ControlNetModel folders only")
    if config.get("global_pool_conditions"):
        raise SourceError(f"ControlNet {spec.source} pools its residuals (global_pool_conditions); "
                          "only ControlNets with full-size residuals are supported")
    text_configs = {n: info.configs[n] for n in ("text_encoder", "text_encoder_2") if n in info.configs}
    try:
        check_controlnet(spec.source, config, info.spec, info.configs["unet"], text_configs)
    except ValueError as exc:
        raise SourceError(str(exc)) from None
    return ControlNetSource(spec, controlnet_name(index), folder, config, folder_fingerprint(folder))


def inspect_controlnets(info: SourceInfo, specs: list[ControlNetSpec]) -> tuple[SourceInfo, list[ControlNetSource]]:
    """Check every ControlNet against the model (no weights loaded); the model's info with the ControlNet spec."""
    if not specs:
        return info, []
    sources = [_inspect_one(spec, index, info) for index, spec in enumerate(specs)]
    spec = with_controlnets(info.spec, info.configs["unet"], [s.config for s in sources])
    configs = {**info.configs, **{s.component: s.config for s in sources}}  # for the memory estimate
    return replace(info, spec=spec, configs=configs), sources


def controlnet_keys(keys: dict[str, str], sources: list[ControlNetSource]) -> dict[str, str]:
    """Component keys with each ControlNet's fingerprint folded into its own key."""
    out = dict(keys)
    for source in sources:
        data = [keys[source.component], source.fingerprint]
        out[source.component] = hashlib.sha256(json.dumps(data).encode()).hexdigest()
    return out


def attach_controlnets(pipe: Any, sources: list[ControlNetSource], modules: frozenset[str] | set[str],
                       allow_pickle: bool) -> None:
    """Load the ControlNets the build needs (``modules``) onto the source pipeline as ``pipe.controlnet_<i>``."""
    import diffusers

    for source in sources:
        if source.component not in modules:
            continue
        _check_weights(source.folder.parent, source.folder.name, allow_pickle)
        model = diffusers.ControlNetModel.from_pretrained(source.folder, use_safetensors=None if allow_pickle
                                                          else True)
        setattr(pipe, source.component, model.float().eval())
        log.info("loaded ControlNet %s as %s", source.spec.source, source.component)


def controlnet_pipeline(source_pipe: Any, spec: ModelSpec, controlnets: list[Any]) -> Any:
    """diffusers' ControlNet pipeline of the spec's family over the source's modules and these ControlNet modules
    (the parity oracle)."""
    import diffusers

    from sdexport.export.load import assemble
    from sdexport.export.parity import _alias_text_model

    net = controlnets[0] if len(controlnets) == 1 else diffusers.MultiControlNetModel(controlnets)
    parts = {**source_pipe.components, "controlnet": net}
    pipe = assemble(CONTROLNET_PIPELINES[spec.family], parts, spec.pipeline_config)
    pipe.set_progress_bar_config(disable=True)
    for attr in ("text_encoder", "text_encoder_2"):
        _alias_text_model(getattr(pipe, attr, None))
    return pipe


def attach_recorded(pipe: Any, manifest: Mapping[str, Any]) -> None:
    """Load the ControlNets a folder's manifest lists onto ``pipe`` (``sdexport parity``), each checked by hash."""
    import diffusers

    for record in manifest.get("controlnets", []):
        folder = Path(record["path"])
        if not folder.is_dir() or folder_fingerprint(folder) != record["hash"]:
            raise SourceError(f"ControlNet {record['source']} ({folder}) is missing or changed since the build; "
                              "rebuild first")
        model = diffusers.ControlNetModel.from_pretrained(folder, use_safetensors=True)
        setattr(pipe, record["component"], model.float().eval())


def recorded_pipeline(source_pipe: Any, spec: ModelSpec) -> Any:
    """diffusers' ControlNet pipeline over a source whose ControlNets were attached by ``attach_recorded``."""
    return controlnet_pipeline(source_pipe, spec, [getattr(source_pipe, c) for c in controlnet_components(spec)])
