"""The compiled-model folder: manifest, hashes, atomic writes, the build lock and verification on load.

Layout of a folder::

    manifest.json                       written LAST; a folder without it is an unfinished build
    <component>/model.onnx              one graph per component (text_encoder, text_encoder_2, unet, vae_*)
    <component>/model.onnx.data         its weights when the graph is over 2 GB (one file per graph)
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdexport.errors import ArtifactError, BuildLockedError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
LOCK = ".lock"
BUILD_DIR = ".build"


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
    """Parse manifest.json; raise ArtifactError for a missing, unreadable or foreign manifest."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder} does not exist")
    if not path.is_file():
        raise ArtifactError(
            f"{folder} has no {MANIFEST}: it is not an sdexport folder or its build did not finish; "
            f"run `sdexport build ... --out {folder}` to complete it"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); rebuild the folder") from exc
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema_version={version!r}; this sdexport reads {SCHEMA_VERSION}: rebuild the folder"
        )
    return manifest


def check_inside(folder: Path, relative: str) -> Path:
    """Resolve ``relative`` under ``folder``; refuse absolute paths and anything escaping the folder."""
    root = folder.resolve()
    target = (root / relative).resolve()
    if Path(relative).is_absolute() or (target != root and root not in target.parents):
        raise ArtifactError(f"{relative!r} in {folder} points outside the folder; refusing to use it")
    return target


def external_data_locations(graph: Path) -> list[str]:
    """The external-data file names a graph refers to (read without loading any weights)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    locations: set[str] = set()
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(locations)


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


def check_no_strays(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file next to a component's graph must be one the manifest vouches for (no unverified weights)."""
    root = folder.resolve()
    files = manifest.get("files", {})
    for name, record in manifest.get("components", {}).items():
        graph = check_inside(folder, record["graph"])
        for path in graph.parent.iterdir():
            if path.is_file() and str(path.relative_to(root)) not in files:
                raise ArtifactError(f"{name}: {path} is not listed in the manifest; remove it or rebuild the folder")


def load_manifest(folder: str | os.PathLike[str], verify: bool = True, inspect_graphs: bool = True
                  ) -> dict[str, Any]:
    """Read and verify a compiled folder (sizes always, sha256 when ``verify``); returns the manifest.

    ``inspect_graphs`` also reads each graph's external-data references (needs the onnx package; the serving
    runtime, which must not import it, adds ``check_no_strays`` instead).
    """
    root = Path(folder)
    manifest = read_manifest(root)
    verify_files(root, manifest.get("files", {}), hashes=verify)
    if verify and inspect_graphs:
        for name, comp in manifest.get("components", {}).items():
            for location in external_data_locations(check_inside(root, comp["graph"])):
                rel = str(Path(comp["graph"]).parent / location)
                check_inside(root, rel)
                if rel not in manifest["files"]:
                    raise ArtifactError(f"{name}: external data {rel!r} is not a file the manifest vouches for")
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json last and atomically, after the caller has verified every file it lists."""
    atomic_write_json(folder / MANIFEST, dict(manifest, schema_version=SCHEMA_VERSION))


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
    for lora in manifest.get("loras", []):
        lines.append(f"  lora       {lora['name']} weight {lora['weight']} -> {', '.join(lora.get('components', []))}")
    total = 0
    for name, comp in manifest["components"].items():
        size = sum(r["size"] for p, r in manifest["files"].items() if p.startswith(name + "/"))
        total += size
        worst = max(
            (o["max_abs_diff"] for s in comp["validation"]["shapes"] for o in s["outputs"].values()), default=0.0
        )
        lines.append(f"  {name:<15} {comp['precision']}  {size / 2**20:9.1f} MiB  validated, max |diff| {worst:.2e}")
    lines.append(f"  total      {total / 2**20:.1f} MiB of graphs")
    return "\n".join(lines)
