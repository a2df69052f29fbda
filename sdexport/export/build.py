"""`sdexport build`, in phases: plan -> load/fuse -> trace -> convert/validate -> backend compile -> manifest.

The plan phase (``build_plan``) keys every component; finished components are reused, an interrupted build resumes,
and ``manifest.json`` is written last, under the folder's build lock.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from sdexport import __version__
from sdexport.engines import artifacts
from sdexport.engines import openvino_quantize as quantized
from sdexport.errors import ArtifactError
from sdexport.export.build_plan import PRECISIONS, BuildConfig, BuildPlan, plan_build, schedule, up_to_date_manifest
from sdexport.export.controlnet import attach_controlnets
from sdexport.export.load import load_source
from sdexport.export.lora import LORA_TARGETS, fuse_loras
from sdexport.export.memory import check_budget
from sdexport.progress import Step

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "BuildConfig", "BuildResult", "build"]
TOOLS = ("torch", "diffusers", "transformers", "peft", "onnx", "onnxruntime")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")
Progress = Callable[[str], None]
LORAS_RECORD = Path(artifacts.BUILD_DIR) / "loras.json"  # the fused LoRAs, for builds that reuse every graph


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


def _load(plan: BuildPlan) -> tuple[Any, list[dict[str, Any]]]:
    """Load/fuse: the source modules the rebuilt components need, LoRAs fused; (source or None, LoRA records)."""
    loras_path = plan.folder / LORAS_RECORD
    if not plan.todo:
        return None, json.loads(loras_path.read_text()) if loras_path.is_file() else plan.loras
    t0 = time.perf_counter()
    modules = {"vae" if n.startswith("vae") else n for n in plan.todo}
    if plan.config.loras:
        modules |= {c for c in LORA_TARGETS if c in plan.info.spec.components}
    ip_adapter = plan.config.ip_adapter if modules & {"unet", "image_encoder"} else None
    if ip_adapter is not None:
        modules.add("unet")  # diffusers loads the adapter through the UNet
    changes = bool(plan.config.loras or ip_adapter)  # an in-memory source is then copied, never changed
    source = load_source(plan.info, plan.config.allow_pickle, frozenset(modules), private=changes)
    attach_controlnets(source.pipe, plan.controlnets, modules, plan.config.allow_pickle)
    fused = fuse_loras(source.pipe, plan.config.loras, plan.config.allow_pickle) if plan.config.loras else []
    if ip_adapter is not None:
        from sdexport.export.ip_adapter import load_into

        load_into(source.pipe, ip_adapter)
    plan.seconds["load"] = time.perf_counter() - t0
    return source, fused


def _trace(plan: BuildPlan, source: Any, say: Progress) -> list[Any]:
    """Trace every component to rebuild while torch holds the weights, freeing each module once traced."""
    from sdexport.export.component import export_raw

    raws = []
    for index, name in enumerate(plan.todo):
        say(Step(f"{name}: exporting ({plan.precisions[name]})", "export", index, len(plan.todo)))
        t0 = time.perf_counter()
        raws.append(export_raw(source, name, plan.precisions[name], plan.ranges, plan.folder))
        _free_after(source.pipe, name, plan.todo[index + 1:])
        plan.seconds[name] = time.perf_counter() - t0
    return raws


def _convert(plan: BuildPlan, raws: list[Any], say: Progress) -> None:
    """Convert and validate each traced graph with no torch model in memory (the largest graphs need that room)."""
    from sdexport.export.component import finish

    while raws:
        raw = raws.pop(0)
        name = raw.name
        t0 = time.perf_counter()
        record = finish(raw, plan.info.spec, plan.ranges, plan.folder)
        del raw
        plan.seconds[name] += time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record.update(key=plan.keys[name], build_seconds=round(plan.seconds[name], 2), peak_rss_mib=round(peak))
        plan.records[name] = record
        artifacts.atomic_write_json(plan.folder / artifacts.BUILD_DIR / f"{name}.json", record)
        say(Step(f"{name}: {plan.precisions[name]} graph validated, {plan.seconds[name]:.1f} s (peak RSS so far "
                 f"{peak:.0f} MiB)", "validate", len(plan.todo) - len(raws), len(plan.todo)))


def _manifest(plan: BuildPlan, fused: list[dict[str, Any]], support: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest of the graphs and support files (the backend's compile hook may add to it)."""
    records = {n: plan.records[n] or {} for n in plan.precisions}
    files: dict[str, dict[str, Any]] = {}
    for record in records.values():
        files.update(record["files"])
    files.update(support)
    return {
        "sdexport_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_key": plan.build_key,
        "source": plan.info.description(),
        "model": plan.info.spec.to_dict(),
        "shape_ranges": plan.ranges.to_dict(),
        "shape_ranges_origin": plan.ranges_origin,
        "loras": fused,
        **({"controlnets": [c.record() for c in plan.controlnets]} if plan.controlnets else {}),
        "tools": _tool_versions(),
        "backend": plan.backend.name,
        "components": {n: {k: v for k, v in r.items() if k != "files"} for n, r in records.items()},
        "tokenizers": sorted({p.split("/")[0] for p in files if p.startswith("tokenizer")}),
        "scheduler_config": "scheduler/scheduler_config.json",
        "files": dict(sorted(files.items())),
    }


def _compile(plan: BuildPlan, manifest: dict[str, Any], say: Progress) -> None:
    """The backend's compile hook (TensorRT engines; nothing for ONNX Runtime); its output joins the manifest."""
    added = plan.backend.compile_folder(plan.folder, manifest, plan.backend_options, say)
    files = added.pop("files", {})
    manifest.update(added)
    manifest["files"] = dict(sorted({**manifest["files"], **files}.items()))


def _finish(plan: BuildPlan, manifest: dict[str, Any], say: Progress) -> BuildResult:
    """Verify every listed file, write the manifest last, drop what the model no longer has.

    A quantised IR (``sdexport quantize``) stays when the graph it was made from is unchanged, else it goes."""
    with contextlib.suppress(ArtifactError):
        quantized.carry_over(artifacts.read_manifest(plan.folder), manifest)
    artifacts.verify_files(plan.folder, manifest["files"], hashes=False)
    artifacts.write_manifest(plan.folder, manifest)
    _remove_strays(plan.folder, manifest)
    quantized.remove_stale(plan.folder, manifest)
    say(f"{plan.folder}: built {', '.join(plan.todo) or 'manifest'}; reused {', '.join(plan.reused)}")
    return BuildResult(plan.folder, manifest, plan.todo, plan.reused, plan.seconds)


def build(config: BuildConfig, progress: Progress | None = None) -> BuildResult:
    """Build (or bring up to date) the compiled folder ``config.out``."""
    say = progress or (lambda msg: log.info("%s", msg))
    plan = plan_build(config)
    with artifacts.build_lock(plan.folder):
        schedule(plan)
        check_budget(plan.info.configs, plan.info.spec, plan.todo, plan.ranges, plan.config.memory_budget)
        manifest = up_to_date_manifest(plan)
        if manifest is not None:
            say(f"{plan.folder}: up to date")
            return BuildResult(plan.folder, manifest, [], plan.reused, {})
        source, fused = _load(plan)
        # Everything that can be refused has been checked; from here on the folder is an unfinished build until
        # the new manifest lands.
        (plan.folder / artifacts.MANIFEST).unlink(missing_ok=True)
        if source is not None:
            artifacts.atomic_write_json(plan.folder / LORAS_RECORD, fused)
        support = _copy_support_files(source, plan.folder) if source is not None else _support_records(plan.folder)
        raws = _trace(plan, source, say) if source is not None else []
        source = None  # phase 2 converts with no torch model in memory
        gc.collect()
        _convert(plan, raws, say)
        manifest = _manifest(plan, fused, support)
        _compile(plan, manifest, say)
        return _finish(plan, manifest, say)
