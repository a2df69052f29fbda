"""Load the source pipeline: a preset, a hub id, a local diffusers folder, or a tiny / random-weights model."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdexport.errors import SourceError, UsageError
from sdexport.specs import FAMILY_PRESETS, PRESETS, Family, ModelSpec, family, model_spec, resolve_preset
from sdexport.specs.families.base import CLIP_PAD
from sdexport.specs.presets import Preset

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES_SAFE = (".safetensors",)
WEIGHT_SUFFIXES_PICKLE = (".bin", ".ckpt", ".pt", ".pth")
_HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
RANDOM_SEED = 20240611


@dataclass
class Source:
    """A loaded source: the diffusers pipeline object, its spec, and where its tokenizer / scheduler come from."""

    pipe: Any
    spec: ModelSpec
    description: dict[str, Any]
    tokenizer_dirs: dict[str, Path]
    scheduler_config: dict[str, Any]
    tiny: bool = False
    _tmp: list[tempfile.TemporaryDirectory] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc


def _sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _text_model_class(config: dict[str, Any]) -> type:
    import transformers

    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise SourceError(f"text encoder architecture {arch!r} is not supported; CLIP text models only")
    return getattr(transformers, arch)


def assemble(class_name: str, parts: dict[str, Any], pipeline_config: dict[str, Any]) -> Any:
    """The diffusers pipeline ``class_name`` over ``parts``, configured like the model_index (``pipeline_config``).

    Parts the class takes but the family lacks (safety checker, the refiner's first encoder) are None; no safety
    checker, no watermark.
    """
    import diffusers

    cls = getattr(diffusers, class_name)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: parts.get(k) for k, p in params.items() if k != "self" and p.default is inspect.Parameter.empty}
    kwargs.update({k: v for k, v in parts.items() if k in params})
    extra = {"requires_safety_checker": False, "add_watermarker": False, **pipeline_config}
    kwargs.update({k: v for k, v in extra.items() if k in params and not k.startswith("_")})
    return cls(**kwargs)


def _build_random(configs: dict[str, Any], info: Family, tok_root: Path, modules: frozenset[str]
                  ) -> tuple[dict[str, Any], dict[str, Path]]:
    """Instantiate ``modules`` from configs with seeded random weights (each its own seed), plus CLIP tokenizers."""
    import diffusers
    import transformers

    from sdexport.export.tokenizer_files import write_clip_tokenizer

    parts: dict[str, Any] = {}
    tokenizer_dirs: dict[str, Path] = {}
    for index, name in enumerate(("text_encoder", "text_encoder_2")):
        if name not in configs:
            continue
        cfg = {k: v for k, v in configs[name].items() if k != "architectures"}
        torch.manual_seed(RANDOM_SEED + index)
        parts[name] = _text_model_class(configs[name])(transformers.CLIPTextConfig(**cfg)).eval() if (
            name in modules) else None
        tok_name = name.replace("text_encoder", "tokenizer")
        # Each tokenizer pads like the family's released checkpoints ("!" for the OpenCLIP encoders).
        pad = info.encoder(name).pad_token if name in info.encoder_names else CLIP_PAD
        tokenizer_dirs[tok_name] = write_clip_tokenizer(tok_root / tok_name, pad_token=pad)
        parts[tok_name] = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dirs[tok_name]))
    torch.manual_seed(RANDOM_SEED + 10)
    parts["unet"] = diffusers.UNet2DConditionModel(**configs["unet"]).eval() if "unet" in modules else None
    torch.manual_seed(RANDOM_SEED + 20)
    parts["vae"] = diffusers.AutoencoderKL(**configs["vae"]).eval() if "vae" in modules else None
    sched_cfg = configs["scheduler"]
    parts["scheduler"] = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    return parts, tokenizer_dirs


def _check_weights(folder: Path, subfolder: str, allow_pickle: bool) -> None:
    sub = folder / subfolder
    files = [p for p in sub.iterdir() if p.is_file()] if sub.is_dir() else []
    if any(p.name.endswith(WEIGHT_SUFFIXES_SAFE) for p in files):
        return
    pickles = [p.name for p in files if p.name.endswith(WEIGHT_SUFFIXES_PICKLE)]
    if pickles and not allow_pickle:
        raise SourceError(
            f"{sub} has only pickle weights ({', '.join(pickles)}), which can run code when loaded. Convert them "
            "once with `python -c \"from diffusers import DiffusionPipeline as P; "
            f"P.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\"` "
            "or pass --allow-pickle if you trust the file"
        )
    if not pickles:
        raise SourceError(f"{sub} has no weights (*.safetensors)")


def folder_configs(folder: Path) -> dict[str, Any]:
    """The configs of a local diffusers folder (model_index, unet, vae, text encoders, scheduler)."""
    if not folder.is_dir():
        raise SourceError(f"model folder {folder} does not exist")
    if not (folder / "model_index.json").is_file():
        raise SourceError(f"{folder} is not a diffusers folder: it has no model_index.json")
    configs: dict[str, Any] = {"model_index": _read_json(folder / "model_index.json")}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        cfg_path = folder / name / "config.json"
        if cfg_path.is_file():
            configs[name] = _read_json(cfg_path)
    for name in ("unet", "vae"):
        if name not in configs:
            raise SourceError(f"{folder} has no {name}/config.json; a Stable Diffusion folder needs one")
    configs["scheduler"] = _read_json(folder / "scheduler" / "scheduler_config.json")
    return configs


def _load_folder(folder: Path, allow_pickle: bool, modules: frozenset[str]
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Path]]:
    """Load the components of a local diffusers folder; returns (parts, configs, tokenizer dirs)."""
    import diffusers
    import transformers

    configs = folder_configs(folder)
    use_safe = None if allow_pickle else True  # None: safetensors when present, else the trusted pickle
    parts: dict[str, Any] = {}
    tokenizer_dirs: dict[str, Path] = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name not in configs:
            continue
        _check_weights(folder, name, allow_pickle)
    parts["unet"] = _load_part(diffusers.UNet2DConditionModel, folder, "unet", use_safe) if (
        "unet" in modules) else None
    parts["vae"] = _load_part(diffusers.AutoencoderKL, folder, "vae", use_safe) if "vae" in modules else None
    for name in ("text_encoder", "text_encoder_2"):
        if name not in configs:
            continue
        cls = _text_model_class(configs[name])
        parts[name] = _load_part(cls, folder, name, use_safe) if name in modules else None
        tok = name.replace("text_encoder", "tokenizer")
        if not (folder / tok).is_dir():
            raise SourceError(f"{folder} has {name} but no {tok} folder")
        tokenizer_dirs[tok] = folder / tok
        parts[tok] = transformers.CLIPTokenizer.from_pretrained(folder, subfolder=tok)
    parts["scheduler"] = getattr(diffusers, configs["scheduler"]["_class_name"]).from_config(configs["scheduler"])
    for model in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if parts.get(model) is not None:
            parts[model] = parts[model].float().eval()
    return parts, configs, tokenizer_dirs


def _load_part(cls: type, folder: Path, name: str, use_safe: bool | None) -> Any:
    """``cls.from_pretrained`` of one subfolder; unreadable weights raise SourceError naming the files."""
    try:
        return cls.from_pretrained(folder, subfolder=name, use_safetensors=use_safe)
    except Exception as exc:  # noqa: BLE001 - safetensors, torch.load and diffusers raise many types
        weights = sorted(p.name for p in (folder / name).iterdir()
                         if p.name.endswith(WEIGHT_SUFFIXES_SAFE + WEIGHT_SUFFIXES_PICKLE))
        detail = str(exc).strip().splitlines()[0][:300].rstrip(". ") if str(exc).strip() else type(exc).__name__
        raise SourceError(f"cannot load the {name} weights of {folder} ({', '.join(weights)} in {folder / name}): "
                          f"{detail}. The file is truncated, corrupt or not a {name} checkpoint: download or save "
                          "it again") from exc


def folder_fingerprint(folder: Path) -> str:
    """sha256 over every config, tokenizer and weight file of a diffusers folder (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix not in (".json", ".txt", ".safetensors", ".bin", ".ckpt"):
            continue
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _hub_folder(hub_id: str) -> Path:
    """The local snapshot of a hub repository: the cache first, then the hub, with a clear error if neither."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception as cached_exc:  # noqa: BLE001 - any cache miss falls through to the network
        log.info("%s is not in the local Hugging Face cache (%s); trying the hub", hub_id, cached_exc)
    try:
        return Path(snapshot_download(hub_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - turned into one actionable message
        raise SourceError(
            f"model {hub_id!r} is neither in the local Hugging Face cache nor reachable on the hub ({exc}). "
            "Ways out: pass a local diffusers folder (--model ./folder), log in / set HF_TOKEN, or build the "
            "architecture with random weights (--model <family preset> --random-weights)"
        ) from exc


def source_identity(model: str, random_weights: bool) -> tuple[str, Preset | None]:
    """Classify ``--model``: 'tiny', 'random', 'preset', 'folder' or 'hub'; with the preset when there is one."""
    preset = resolve_preset(model)
    if preset is not None and preset.tiny:
        return "tiny", preset
    if preset is not None and preset.folder is not None:
        if random_weights:
            raise UsageError(f"--random-weights needs a family preset, not the trained {model!r}; choose one of "
                             f"{', '.join(FAMILY_PRESETS)}")
        return "folder", preset
    if preset is not None:
        return ("random" if random_weights else "preset"), preset
    if random_weights:
        raise UsageError(
            f"--random-weights needs a family preset, not {model!r}; choose one of {', '.join(FAMILY_PRESETS)}"
        )
    if Path(model).exists() or model.startswith((".", "/", "~")):
        return "folder", None
    if model.count("/") != 1:
        raise UsageError(
            f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}), an existing folder, "
            "or a hub id of the form owner/name"
        )
    return "hub", None


@dataclass(frozen=True)
class SourceInfo:
    """What is known about a source before loading any weights: kind, configs, spec and fingerprint."""

    model: str
    kind: str
    preset: Preset | None
    folder: Path | None
    configs: dict[str, Any]
    spec: ModelSpec
    fingerprint: str
    parts: Any = field(default=None, compare=False, repr=False)
    """The modules of an in-memory source (kind "memory")."""
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    """Adapters built into the graphs: name -> record (path, sha256, the components they change)."""

    def description(self) -> dict[str, Any]:
        """The manifest's ``source`` entry."""
        out: dict[str, Any] = {"kind": self.kind, "id": self.model, "hash": self.fingerprint}
        if self.preset is not None and self.preset.hub_id and self.kind != "random":
            out["hub_id"] = self.preset.hub_id
        if self.folder is not None:
            out["path"] = str(self.folder)
        out.update({name: {k: v for k, v in record.items() if k != "components"}
                    for name, record in self.adapters.items()})
        return out


def inspect_source(model: Any, random_weights: bool = False) -> SourceInfo:
    """Resolve ``--model`` (or an in-memory pipeline) and read its configs and fingerprint, without loading weights."""
    from sdexport.export.memory_source import inspect_memory, is_memory_source

    if is_memory_source(model):
        if random_weights:
            raise UsageError("random_weights applies to family presets, not to an in-memory pipeline")
        return inspect_memory(model)
    kind, preset = source_identity(model, random_weights)
    folder = None
    if kind in ("tiny", "random"):
        configs = preset.configs()
        fingerprint = _sha256_json({"configs": configs, "seed": RANDOM_SEED, "kind": kind})
    else:
        if kind == "folder":
            folder = preset.folder if preset is not None else Path(model).expanduser().resolve()
        else:
            folder = _hub_folder(preset.hub_id if preset else model)
        configs = folder_configs(folder)
        fingerprint = folder_fingerprint(folder)
    return SourceInfo(model, kind, preset, folder, configs, spec_from_configs(model, configs), fingerprint)


def spec_from_configs(model: str, configs: dict[str, Any]) -> ModelSpec:
    """The ModelSpec of a source from its configs (model_index, unet, vae, text encoders)."""
    text_configs = {n: configs[n] for n in ("text_encoder", "text_encoder_2") if n in configs}
    pipeline_config = {
        k: v for k, v in configs["model_index"].items()
        if k in ("_class_name", "force_zeros_for_empty_prompt", "requires_aesthetics_score")
    }
    try:
        return model_spec(configs["unet"], configs["vae"], text_configs, pipeline_config)
    except (ValueError, KeyError) as exc:
        raise SourceError(f"{model}: unsupported model configuration: {exc}") from exc


ALL_MODULES = frozenset({"unet", "vae", "text_encoder", "text_encoder_2"})


def load_source(info: SourceInfo, allow_pickle: bool = False, modules: frozenset[str] = ALL_MODULES,
                private: bool = False) -> Source:
    """Load the weights of an inspected source into a Source; modules not in ``modules`` stay None (memory).

    ``private``: an in-memory source's modules are deep-copied (for builds that change them: LoRAs, adapters).
    """
    if info.kind == "memory":
        from sdexport.export.memory_source import load_memory

        return load_memory(info, modules, private)
    tmp: list[tempfile.TemporaryDirectory] = []
    record = family(info.spec.family)
    if info.kind in ("tiny", "random"):
        tdir = tempfile.TemporaryDirectory(prefix="sdexport-tok-")
        tmp.append(tdir)
        parts, tokenizer_dirs = _build_random(info.configs, record, Path(tdir.name), modules)
    else:
        parts, _, tokenizer_dirs = _load_folder(info.folder, allow_pickle, modules)
    needed = record.encoder_names
    parts = {k: v for k, v in parts.items() if k not in ("text_encoder", "tokenizer") or "text_encoder" in needed}
    pipe = assemble(record.source_pipeline, parts, info.spec.pipeline_config)
    log.info("loaded %s (%s): family %s%s", info.model, info.kind, info.spec.family,
             " inpaint" if info.spec.inpaint else "")
    return Source(pipe, info.spec, info.description(), tokenizer_dirs, dict(info.configs["scheduler"]),
                  info.kind == "tiny", tmp)
