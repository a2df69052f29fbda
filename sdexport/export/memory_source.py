"""An in-memory source: a diffusers pipeline object (or its parts) compiled exactly as it is, processors included.

``sdexport.build(BuildConfig(model=pipe, out=...))`` takes a pipeline whose modules may carry custom attention
processors (``pipe.unet.set_attn_processor(...)``) or any other in-memory change. Its fingerprint hashes every
module's config and state dict and each attention processor (class, source code, attributes), so an unchanged
pipeline reuses a finished build and any change rebuilds.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdexport.errors import SourceError
from sdexport.export.processors import class_path

log = logging.getLogger(__name__)

MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")
PARTS = (*MODULES, "tokenizer", "tokenizer_2", "scheduler")
_PIPELINE_KEYS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")


def is_memory_source(model: Any) -> bool:
    """Whether ``model`` is an in-memory pipeline / parts (anything but a model name or path)."""
    return not isinstance(model, str | Path)


def memory_parts(model: Any) -> dict[str, Any]:
    """The UNet, VAE, text encoder(s), tokenizer(s) and scheduler of a pipeline, a mapping or an object."""
    if isinstance(model, Mapping):
        parts = {k: model.get(k) for k in PARTS}
    elif hasattr(model, "components") and isinstance(model.components, Mapping):
        parts = {k: model.components.get(k) for k in PARTS}
    else:
        parts = {k: getattr(model, k, None) for k in PARTS}
    missing = [k for k in ("unet", "vae", "scheduler") if parts[k] is None]
    if missing:
        raise SourceError(f"the in-memory source {type(model).__name__} has no {', '.join(missing)}; pass a "
                          "diffusers pipeline or a dict with unet, vae, text_encoder(s), tokenizer(s) and scheduler")
    if getattr(parts["unet"], "encoder_hid_proj", None) is not None:
        raise SourceError("the in-memory UNet has an IP-Adapter loaded (pipe.load_ip_adapter); build from the "
                          "pipeline without it (pipe.unload_ip_adapter()) and pass ip_adapter=PATH instead, so the "
                          "image encoder and the run-time scale are compiled too")
    for enc in ("text_encoder", "text_encoder_2"):
        tok = enc.replace("text_encoder", "tokenizer")
        if parts[enc] is not None and parts[tok] is None:
            raise SourceError(f"the in-memory source has {enc} but no {tok}; pass the tokenizer too")
    return parts


def _plain(config: Any) -> dict[str, Any]:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(data, default=str))


def memory_configs(model: Any, parts: Mapping[str, Any]) -> dict[str, Any]:
    """The configs a diffusers folder would hold (model_index, unet, vae, text encoders, scheduler)."""
    configs: dict[str, Any] = {name: _plain(parts[name].config) for name in MODULES if parts[name] is not None}
    configs["scheduler"] = _plain(parts["scheduler"].config)
    configs["scheduler"].setdefault("_class_name", type(parts["scheduler"]).__name__)
    pipeline_config = getattr(model, "config", {}) if not isinstance(model, Mapping) else model
    index = {"_class_name": type(model).__name__} if hasattr(model, "components") else {}
    index.update({k: pipeline_config[k] for k in _PIPELINE_KEYS if k in pipeline_config})
    configs["model_index"] = index
    return configs


@functools.cache
def _class_code(cls: type) -> str:
    """sha256 of a class's source code ("unavailable" when Python cannot show it)."""
    try:
        return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()
    except (OSError, TypeError):
        return "unavailable"


def _processor_digest(processor: Any) -> dict[str, Any]:
    """A processor's class, the hash of its source code, and its simple attributes (temperature, scale, ...)."""
    code = _class_code(type(processor))
    attrs = {k: repr(v) for k, v in sorted(vars(processor).items())
             if isinstance(v, int | float | str | bool | tuple | list | type(None))}
    return {"class": class_path(processor), "code": code, "attrs": attrs}


def _module_digest(module: torch.nn.Module, digest: Any) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    processors = getattr(module, "attn_processors", None)
    if processors:
        digest.update(json.dumps({k: _processor_digest(p) for k, p in processors.items()}, sort_keys=True).encode())


def memory_fingerprint(parts: Mapping[str, Any], configs: Mapping[str, Any]) -> str:
    """sha256 over the configs, every module's state dict and every attention processor (class, code, attrs)."""
    digest = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode())
    for name in MODULES:
        if parts.get(name) is not None:
            digest.update(name.encode())
            _module_digest(parts[name], digest)
    return digest.hexdigest()


def memory_tokenizers(parts: Mapping[str, Any], root: Path) -> dict[str, Path]:
    """Save the in-memory tokenizers under ``root`` (the build copies their files into the folder)."""
    dirs = {}
    for tok in ("tokenizer", "tokenizer_2"):
        if parts.get(tok) is not None:
            parts[tok].save_pretrained(str(root / tok))
            dirs[tok] = root / tok
    return dirs


def memory_pipeline_parts(parts: Mapping[str, Any], modules: frozenset[str], private: bool
                          ) -> tuple[dict[str, Any], tempfile.TemporaryDirectory]:
    """The parts to assemble the build's pipeline from, with the tokenizers saved to a temporary folder.

    ``private``: deep-copy the torch modules first, for builds that change them (LoRA fusion, an IP-Adapter), so
    the caller's pipeline stays as it was.
    """
    out = dict(parts)
    for name in MODULES:
        module = out.get(name)
        if module is None:
            continue
        if name not in modules:
            out[name] = None
            continue
        float32 = all(p.dtype == torch.float32 for p in module.parameters())
        if private or not float32:
            # Traced in float32 (the build converts to fp16 per component); the caller's module is left alone.
            module = copy.deepcopy(module).float()
        out[name] = module.eval()
    tmp = tempfile.TemporaryDirectory(prefix="sdexport-memory-")
    return out, tmp


def inspect_memory(model: Any) -> Any:
    """The SourceInfo of an in-memory pipeline (kind "memory"), fingerprinted from its weights and processors."""
    from sdexport.export.load import SourceInfo, spec_from_configs

    parts = memory_parts(model)
    configs = memory_configs(model, parts)
    fingerprint = memory_fingerprint(parts, configs)
    name = f"in-memory {type(model).__name__}"
    return SourceInfo(name, "memory", None, None, configs, spec_from_configs(name, configs), fingerprint,
                      parts=parts)


def load_memory(info: Any, modules: frozenset[str], private: bool) -> Any:
    """A Source over an inspected in-memory pipeline (its modules themselves, or private copies)."""
    from sdexport.export.load import Source, assemble
    from sdexport.specs import family

    record = family(info.spec.family)
    parts, tmp = memory_pipeline_parts(info.parts, modules, private)
    tokenizer_dirs = memory_tokenizers(parts, Path(tmp.name))
    if "text_encoder" not in record.encoder_names:
        parts = {k: v for k, v in parts.items() if k not in ("text_encoder", "tokenizer")}
    pipe = assemble(record.source_pipeline, parts, info.spec.pipeline_config)
    log.info("using %s: family %s, fingerprint %s", info.model, info.spec.family, info.fingerprint[:12])
    return Source(pipe, info.spec, info.description(), tokenizer_dirs, dict(info.configs["scheduler"]), False, [tmp])
