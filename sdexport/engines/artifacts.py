"""The compiled-model folder: manifest, hashes, atomic writes, the build lock and verification on load.

Layout of a folder::

    manifest.json                       written LAST; a folder without it is an unfinished build
    <component>/model.onnx              one graph per component (text_encoder, text_encoder_2, unet, vae_*)
    <component>/model.onnx.data         its weights, page-aligned (one file per graph; fused siblings share it)
    <component>/model.ort.onnx          the fused sibling: attention as com.microsoft.MultiHeadAttention
    tokenizer/, tokenizer_2/            CLIP tokenizer files (vocab.json, merges.txt, configs)
    scheduler/scheduler_config.json     the source's scheduler config
    .build/<component>.json             per-component records of an unfinished build (resume points)

The manifest's ``files`` maps every file above (relative path) to its size and sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sdexport.engines.manifest_schema import validate_manifest
from sdexport.engines.onnx_refs import external_data_locations
from sdexport.errors import ArtifactError, BuildLockedError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
LOCK = ".lock"
BUILD_DIR = ".build"
DEFAULT_SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
SPECIAL_TOKENS = "special_tokens_map.json"
# Written by the build beside a component's portable graph when it has attention to fuse (export.fused_attention):
# the same weights under the same names, attention as com.microsoft.MultiHeadAttention, which ONNX Runtime's CPU
# kernel runs without materialising the score matrix. OpenVINO reads it too (as ScaledDotProductAttention) but runs
# the portable graph as fast, its own attention fusion being as good (benchmarks/README.md); TensorRT takes the
# portable graph.
FUSED_GRAPH = "model.ort.onnx"
QUANTIZED = "openvino_quantized"
"""A component record's key describing the int8 IR ``sdexport quantize`` made from its graph (openvino_quantize)."""
QUANTIZED_DIR = "openvino-int8-hybrid"
"""The folder inside a component's folder that holds that IR."""
TOKENIZER_FILES = ("vocab.json", "merges.txt", SPECIAL_TOKENS)
"""What the runtime's tokenizer opens in a tokenizer folder (the special tokens map only when present)."""


def sha256_file(path: Path) -> str:
    """Streaming sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(root: Path, path: Path) -> dict[str, Any]:
    """{"size", "sha256"} of a file inside the folder."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (sorted keys, indented)."""
    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's exclusive lock for the duration of a build; a second build fails at once."""
    # Imported here: only builds lock (filelock comes with the export extra); the runtime imports this module too.
    from filelock import FileLock, Timeout

    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / LOCK, timeout=0)
        lock.acquire()
    except Timeout as exc:
        raise BuildLockedError(
            f"another sdexport build is writing to {folder}; wait for it to finish or use another --out"
        ) from exc
    except OSError as exc:
        raise ArtifactError(f"cannot write to output folder {folder}: {exc.strerror or exc}") from exc
    try:
        yield
    finally:
        lock.release()


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse manifest.json; raise ArtifactError for a missing, unreadable, escaping or foreign manifest."""
    if not folder.is_dir():
        raise ArtifactError(f"{folder} does not exist")
    path = folder / MANIFEST
    if not (path.is_file() or path.is_symlink()):
        raise ArtifactError(
            f"{folder} has no {MANIFEST}: it is not an sdexport folder or its build did not finish; "
            f"run `sdexport build ... --out {folder}` to complete it"
        )
    resolved = check_inside(folder, MANIFEST)
    try:
        manifest = json.loads(resolved.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path} is not valid UTF-8 (byte {exc.start}); rebuild the folder") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); rebuild the folder") from exc
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema_version={version!r}; this sdexport reads {SCHEMA_VERSION}: rebuild the folder"
        )
    return validate_manifest(manifest, path)


def check_inside(folder: Path, relative: str) -> Path:
    """Resolve ``relative`` under ``folder`` (symlinks followed); refuse absolute paths and anything escaping it."""
    try:
        root = Path(folder).resolve(strict=True)
        target = (root / relative).resolve()
    except (OSError, RuntimeError) as exc:
        raise ArtifactError(f"cannot resolve {relative!r} in {folder} ({exc}); rebuild the folder") from None
    if Path(relative).is_absolute() or (target != root and root not in target.parents):
        raise ArtifactError(f"{relative!r} in {folder} points outside the folder; refusing to use it")
    return target


def listed_path(folder: Path, manifest: dict[str, Any], relative: str, what: str) -> Path:
    """The resolved path of ``relative``, a file inside the folder that the manifest lists with its hash."""
    path = check_inside(folder, relative)
    rel = path.relative_to(Path(folder).resolve()).as_posix()
    if rel not in manifest["files"] or rel != Path(relative).as_posix():
        raise ArtifactError(f"{what} {relative!r} in {folder} is not a file the manifest lists with a hash; "
                            "refusing to use it")
    return path


def verify_files(folder: Path, files: dict[str, dict[str, Any]], hashes: bool = True) -> None:
    """Check every listed file exists inside the folder with the recorded size (and sha256 when ``hashes``)."""
    for relative, record in files.items():
        path = check_inside(folder, relative)
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing; rebuild the folder")
        size = path.stat().st_size
        if size != record["size"]:
            raise ArtifactError(
                f"{path} has {size} bytes, the manifest says {record['size']}: truncated or edited; rebuild"
            )
        if hashes and sha256_file(path) != record["sha256"]:
            raise ArtifactError(f"{path} does not match its sha256 in the manifest: edited or corrupted; rebuild")


def check_references(folder: Path, manifest: dict[str, Any]) -> None:
    """Every path the runtime opens (scheduler config, tokenizer files, graphs and their external data) is listed."""
    listed_path(folder, manifest, manifest.get("scheduler_config", DEFAULT_SCHEDULER_CONFIG), "scheduler_config")
    for i, name in enumerate(manifest.get("tokenizers", [])):
        check_inside(folder, name)
        for file in TOKENIZER_FILES:
            relative = f"{name}/{file}"
            if file != SPECIAL_TOKENS or (Path(folder) / relative).is_file():
                listed_path(folder, manifest, relative, f"tokenizers[{i}] file")
    for name, comp in manifest["components"].items():
        listed_path(folder, manifest, comp["graph"], f"components.{name}.graph")
        if "weight_map" in comp:
            listed_path(folder, manifest, comp["weight_map"], f"components.{name}.weight_map")
        if QUANTIZED in comp:
            _check_quantized(folder, manifest, name, comp)
    for relative in manifest["files"]:
        if relative.endswith(".onnx"):
            for location in external_data_locations(check_inside(folder, relative)):
                where = (Path(relative).parent / location).as_posix()
                listed_path(folder, manifest, where, f"external data of {relative}:")


def _check_quantized(folder: Path, manifest: dict[str, Any], name: str, comp: dict[str, Any]) -> None:
    """A quantised IR: its .xml and .bin are listed, and it was made from the graph the folder holds now."""
    graph = comp[QUANTIZED]["graph"]
    listed_path(folder, manifest, graph, f"components.{name}.{QUANTIZED}.graph")
    listed_path(folder, manifest, str(Path(graph).with_suffix(".bin")), f"weights of {graph}:")
    if comp[QUANTIZED]["source_sha256"] != manifest["files"][comp["graph"]]["sha256"]:
        raise ArtifactError(f"{graph} in {folder} was made from another {comp['graph']}; run `sdexport quantize "
                            f"{folder} --component {name}` again")


def check_no_strays(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file in a component's or tokenizer's folder must be one the manifest vouches for (no unverified files)."""
    root = Path(folder).resolve()
    files = manifest["files"]
    dirs = {check_inside(folder, record["graph"]).parent for record in manifest["components"].values()}
    dirs |= {check_inside(folder, name) for name in manifest.get("tokenizers", [])}
    for directory in sorted(dirs):
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if (path.is_symlink() or path.is_file()) and path.relative_to(root).as_posix() not in files:
                raise ArtifactError(f"{path} is not listed in the manifest; remove it or rebuild the folder")


def load_manifest(folder: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """Read and verify a compiled folder (schema, sizes, sha256 when ``verify``, every referenced path, strays).

    The one check both ``sdexport info`` and ``Pipeline.load`` apply; it needs neither onnx nor onnxruntime.
    """
    root = Path(folder)
    manifest = read_manifest(root)
    verify_files(root, manifest["files"], hashes=verify)
    check_references(root, manifest)
    check_no_strays(root, manifest)
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json last and atomically, after the caller has verified every file it lists."""
    atomic_write_json(folder / MANIFEST, dict(manifest, schema_version=SCHEMA_VERSION))


def component_bytes(manifest: Mapping[str, Any], name: str) -> int:
    """Bytes of the files the manifest lists in component ``name``'s directory (its graphs and their weights)."""
    prefix = name + "/"
    listed = sum(int(entry["size"]) for path, entry in manifest["files"].items() if path.startswith(prefix))
    return listed - sum(int(entry["size"]) for entry in quantized_files(manifest, name).values())


def quantized_files(manifest: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The manifest's file records under component ``name``'s quantised-IR folder (``QUANTIZED_DIR``)."""
    prefix = f"{name}/{QUANTIZED_DIR}/"
    return {path: entry for path, entry in manifest["files"].items() if path.startswith(prefix)}


def opt_pixels(manifest: Mapping[str, Any]) -> int | None:
    """Height x width of the image the folder is built around (its shape ranges' opt); None if the manifest has none."""
    ranges = manifest.get("shape_ranges") or {}
    try:
        return int(ranges["height"][1]) * int(ranges["width"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def describe(folder: Path, manifest: dict[str, Any]) -> str:
    """A human-readable summary of a verified folder: source, family, ranges, components, LoRAs, files."""
    model = manifest["model"]
    ranges = manifest["shape_ranges"]
    source = manifest["source"]
    lines = [
        f"{folder}: sdexport {manifest['sdexport_version']} folder, verified ({len(manifest['files'])} files)",
        f"  source     {source['kind']} {source['id']} (sha256 {source['hash'][:12]})",
        f"  family     {model['family']}{' inpaint' if model['inpaint'] else ''}, backend {manifest['backend']}",
        f"  sizes      height {ranges['height']} width {ranges['width']} px (min, opt, max), "
        f"batch {ranges['batch']}, prompt chunks <= {ranges['prompt_chunks']}",
    ]
    if manifest.get("shape_ranges_origin"):
        lines.append(f"             ranges {manifest['shape_ranges_origin']}")
    for lora in manifest.get("loras", []):
        lines.append(f"  lora       {lora['name']} weight {lora['weight']} -> {', '.join(lora.get('components', []))}")
    total = 0
    for name, comp in manifest["components"].items():
        size = component_bytes(manifest, name)
        total += size
        worst = max(
            (o["max_abs_diff"] for s in comp["validation"]["shapes"] for o in s["outputs"].values()), default=0.0
        )
        precision = comp.get("precision", "fp32")
        lines.append(f"  {name:<15} {precision}  {size / 2**20:9.1f} MiB  validated, max |diff| {worst:.2e}")
        if QUANTIZED in comp:
            ir = sum(int(entry["size"]) for entry in quantized_files(manifest, name).values())
            lines.append(f"  {'':<15} {comp[QUANTIZED]['method']} IR {ir / 2**20:.1f} MiB (sdexport quantize, "
                         f"{comp[QUANTIZED]['samples']} calls; --openvino-precision hybrid)")
    lines.append(f"  total      {total / 2**20:.1f} MiB of graphs")
    return "\n".join(lines)


def fused_graph(graph: Path) -> Path:
    """The graph ONNX Runtime opens for a component's portable ``graph``: its fused sibling when there is one."""
    fused = Path(graph).with_name(FUSED_GRAPH)
    return fused if fused != Path(graph) and fused.is_file() else Path(graph)
