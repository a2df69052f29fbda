"""`sdexport build`: source -> LoRA fusion -> per component export, optimise, validate -> manifest written last.

Each component is keyed by everything its graph depends on; a finished component leaves a record in
``.build/<component>.json`` so an interrupted build resumes there, and an unchanged one is reused.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from sdexport import __version__
from sdexport.engines import artifacts
from sdexport.errors import ArtifactError
from sdexport.export.load import SourceInfo, inspect_source, load_source
from sdexport.export.lora import LORA_TARGETS, LoraSpec, fuse_loras
from sdexport.specs import ShapeRanges
from sdexport.specs.presets import default_ranges_for

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
BACKENDS = ("onnxruntime", "tensorrt")
TOOLS = ("torch", "diffusers", "transformers", "peft", "onnx", "onnxruntime")
# Bumped when the exported graphs change for the same source and settings (2: constant-scale attention, fused
# ONNX Runtime graph beside the portable one); part of every component's key, so older builds are redone.
EXPORT_FORMAT = 2
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


@dataclass
class BuildConfig:
    """Everything `sdexport build` takes."""

    model: str
    out: Path
    loras: list[LoraSpec] = field(default_factory=list)
    precision: str = "fp32"
    component_precision: dict[str, str] = field(default_factory=dict)
    ranges: ShapeRanges | None = None
    random_weights: bool = False
    allow_pickle: bool = False
    backend: str = "onnxruntime"
    trt: Any = None  # sdexport.engines.trt_build.TrtOptions when backend == "tensorrt"


@dataclass
class BuildResult:
    """What a build did: the folder, its manifest, which components were rebuilt or reused, and timings."""

    folder: Path
    manifest: dict[str, Any]
    built: list[str]
    reused: list[str]
    seconds: dict[str, float]

    @property
    def up_to_date(self) -> bool:
        """True when nothing had to be rebuilt."""
        return not self.built


def _tool_versions() -> dict[str, str]:
    out = {}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _precision_of(config: BuildConfig, info: SourceInfo, name: str) -> str:
    if name in config.component_precision:
        return config.component_precision[name]
    component = info.spec.components[name]
    if config.precision == "fp16" and not component.fp16_by_default:
        return "fp32"
    return config.precision


def _check_config(config: BuildConfig, info: SourceInfo) -> None:
    if config.backend not in BACKENDS:
        raise ValueError(f"backend {config.backend!r} is not one of {BACKENDS}")
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision {config.precision!r} is not one of {PRECISIONS}")
    for name, precision in config.component_precision.items():
        if name not in info.spec.components:
            raise ValueError(f"--component-precision names {name!r}; this model has {list(info.spec.components)}")
        if precision not in PRECISIONS:
            raise ValueError(f"--component-precision {name}={precision!r}: choose one of {PRECISIONS}")


def _component_key(info: SourceInfo, name: str, precision: str, ranges: ShapeRanges, loras: list[dict]) -> str:
    data = {
        "sdexport": __version__,
        "export_format": EXPORT_FORMAT,
        "source": info.fingerprint,
        "component": info.spec.components[name].to_dict(),
        "precision": precision,
        "ranges": ranges.to_dict(),
        "loras": [(r["sha256"], r["weight"]) for r in loras] if name in LORA_TARGETS else [],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _reusable(folder: Path, record: dict[str, Any] | None, key: str) -> bool:
    if not record or record.get("key") != key:
        return False
    try:
        artifacts.verify_files(folder, record["files"], hashes=True)
    except ArtifactError as exc:
        log.info("rebuilding: %s", exc)
        return False
    return True


def _read_record(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / artifacts.BUILD_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _copy_support_files(source: Any, folder: Path) -> dict[str, dict[str, Any]]:
    """Tokenizer files and scheduler_config.json, written atomically; returns their file records."""
    files: dict[str, dict[str, Any]] = {}
    for tok, src_dir in sorted(source.tokenizer_dirs.items()):
        with tempfile.TemporaryDirectory() as tmp:
            # tokenizer.json (the serialised fast tokenizer) is what the runtime loads; vocab/merges ride along.
            getattr(source.pipe, tok).save_pretrained(tmp)
            for fname in TOKENIZER_FILES:
                src = Path(tmp) / fname if (Path(tmp) / fname).is_file() else Path(src_dir) / fname
                if src.is_file():
                    artifacts.atomic_write_bytes(folder / tok / fname, src.read_bytes())
                    files[f"{tok}/{fname}"] = artifacts.file_record(folder, folder / tok / fname)
        if f"{tok}/tokenizer.json" not in files:
            raise ArtifactError(f"could not serialise {tok} to tokenizer.json")
        if f"{tok}/vocab.json" not in files:
            files.update(_vocab_from_tokenizer_json(folder, tok))
    artifacts.atomic_write_json(folder / "scheduler" / "scheduler_config.json", source.scheduler_config)
    files["scheduler/scheduler_config.json"] = artifacts.file_record(folder, folder / "scheduler" /
                                                                     "scheduler_config.json")
    return files


def _vocab_from_tokenizer_json(folder: Path, tok: str) -> dict[str, dict[str, Any]]:
    """vocab.json and merges.txt recovered from tokenizer.json (folders saved by transformers 5 lack them)."""
    model = json.loads((folder / tok / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    artifacts.atomic_write_bytes(folder / tok / "vocab.json", json.dumps(model["vocab"], ensure_ascii=False).encode())
    artifacts.atomic_write_bytes(folder / tok / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode())
    return {f"{tok}/{n}": artifacts.file_record(folder, folder / tok / n) for n in ("vocab.json", "merges.txt")}


def _free_after(pipe: Any, name: str, remaining: list[str]) -> None:
    """Drop the torch module once no remaining component needs it, so the next export has the memory."""
    attr = "vae" if name.startswith("vae") else name
    if not any(("vae" if r.startswith("vae") else r) == attr for r in remaining):
        setattr(pipe, attr, None)
        gc.collect()
        log.debug("released %s", attr)


def build(config: BuildConfig, progress: Callable[[str], None] | None = None) -> BuildResult:
    """Build (or bring up to date) the compiled folder ``config.out``."""
    from sdexport.export.component import export_raw, finish

    say = progress or (lambda msg: log.info("%s", msg))
    folder = Path(config.out)
    info = inspect_source(config.model, config.random_weights)
    _check_config(config, info)
    ranges = config.ranges or (info.preset.default_ranges if info.preset else default_ranges_for(
        info.spec.family, tiny=False))
    ranges.validate(info.spec.vae_scale_factor)
    lora_records = []
    for lora in config.loras:
        lora.check(config.allow_pickle)
        lora_records.append(lora.record())

    trt_options = None
    if config.backend == "tensorrt":
        from sdexport.engines.trt_build import TrtOptions, preflight

        trt_options = config.trt or TrtOptions()
        preflight(trt_options)  # no GPU or TensorRT here: say so now, not after the export

    with artifacts.build_lock(folder):
        plan = {name: _precision_of(config, info, name) for name in info.spec.components}
        keys = {name: _component_key(info, name, p, ranges, lora_records) for name, p in plan.items()}
        records = {name: _read_record(folder, name) for name in plan}
        todo = [n for n in plan if not _reusable(folder, records[n], keys[n])]
        if not todo and (folder / artifacts.MANIFEST).is_file():
            try:
                manifest = artifacts.load_manifest(folder)
                if manifest.get("build_key") == _build_key(keys, lora_records) and config.backend == "onnxruntime":
                    say(f"{folder}: up to date")
                    return BuildResult(folder, manifest, [], list(plan), {})
            except ArtifactError as exc:
                log.info("rewriting the manifest: %s", exc)
        seconds: dict[str, float] = {}
        source = None
        fused: list[dict[str, Any]] = lora_records
        loras_path = folder / artifacts.BUILD_DIR / "loras.json"
        if todo:
            t0 = time.perf_counter()
            modules = {"vae" if n.startswith("vae") else n for n in todo}
            if config.loras:
                modules |= {c for c in LORA_TARGETS if c in info.spec.components}
            source = load_source(info, config.allow_pickle, frozenset(modules))
            fused = fuse_loras(source.pipe, config.loras, config.allow_pickle) if config.loras else []
            seconds["load"] = time.perf_counter() - t0
        elif loras_path.is_file():
            fused = json.loads(loras_path.read_text())
        # Everything that can be refused has been checked; from here on the folder is an unfinished build until
        # the new manifest lands.
        (folder / artifacts.MANIFEST).unlink(missing_ok=True)
        if source is not None:
            artifacts.atomic_write_json(loras_path, fused)
        support = _copy_support_files(source, folder) if source is not None else _support_records(folder)
        # Phase 1 traces every component while torch holds the weights, freeing each module once traced; phase 2
        # converts and validates with no torch model in memory (the largest graphs need that room).
        raws = []
        for index, name in enumerate(todo):
            say(f"{name}: exporting ({plan[name]})")
            t0 = time.perf_counter()
            raws.append(export_raw(source, name, plan[name], ranges, folder))
            _free_after(source.pipe, name, todo[index + 1:])
            seconds[name] = time.perf_counter() - t0
        source = None
        gc.collect()
        while raws:
            raw = raws.pop(0)
            name = raw.name
            t0 = time.perf_counter()
            records[name] = finish(raw, info.spec, ranges, folder)
            del raw
            seconds[name] += time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            records[name].update(key=keys[name], build_seconds=round(seconds[name], 2), peak_rss_mib=round(peak))
            artifacts.atomic_write_json(folder / artifacts.BUILD_DIR / f"{name}.json", records[name])
            say(f"{name}: {plan[name]} graph validated, {seconds[name]:.1f} s (peak RSS so far {peak:.0f} MiB)")
        files: dict[str, dict[str, Any]] = {}
        for name in plan:
            files.update(records[name]["files"])
        files.update(support)
        manifest = {
            "sdexport_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_key": _build_key(keys, lora_records),
            "source": info.description(),
            "model": info.spec.to_dict(),
            "shape_ranges": ranges.to_dict(),
            "loras": fused,
            "tools": _tool_versions(),
            "backend": "onnxruntime",
            "components": {n: {k: v for k, v in records[n].items() if k != "files"} for n in plan},
            "tokenizers": sorted({p.split("/")[0] for p in files if p.startswith("tokenizer")}),
            "scheduler_config": "scheduler/scheduler_config.json",
            "files": dict(sorted(files.items())),
        }
        if trt_options is not None:
            from sdexport.engines.trt_build import build_engines

            engines = build_engines(folder, manifest, trt_options, progress=say)
            manifest["engines"] = engines["engines"]
            manifest["files"] = dict(sorted({**manifest["files"], **engines["files"]}.items()))
            manifest["backend"] = "tensorrt"
        artifacts.verify_files(folder, manifest["files"], hashes=False)
        artifacts.write_manifest(folder, manifest)
        _remove_strays(folder, manifest)
        say(f"{folder}: built {', '.join(todo) or 'manifest'}; reused {', '.join(n for n in plan if n not in todo)}")
        return BuildResult(folder, manifest, todo, [n for n in plan if n not in todo], seconds)


def _build_key(keys: dict[str, str], loras: list[dict[str, Any]]) -> str:
    data = {"keys": keys, "loras": [(r["sha256"], r["weight"]) for r in loras]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _support_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Records of the tokenizer / scheduler files already in the folder (when no component needed the source)."""
    files = {}
    for path in sorted(folder.glob("tokenizer*/*")) + [folder / "scheduler" / "scheduler_config.json"]:
        if path.is_file():
            files[str(path.relative_to(folder))] = artifacts.file_record(folder, path)
    return files


def _remove_strays(folder: Path, manifest: dict[str, Any]) -> None:
    """Delete component folders of components the model no longer has (e.g. after changing --model)."""
    keep = set(manifest["components"]) | {"scheduler", *manifest["tokenizers"]}
    for path in folder.iterdir():
        if path.is_dir() and not path.name.startswith(".") and path.name not in keep and (path / "model.onnx").exists():
            shutil.rmtree(path)
            log.info("removed %s (not part of this model)", path)
    for stale in (folder / artifacts.BUILD_DIR).glob("*.json"):
        if stale.stem not in manifest["components"]:
            os.unlink(stale)
