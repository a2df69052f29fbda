"""Where samples go: a Hugging Face imagefolder split or WebDataset tar shards; both verify what a resume keeps."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from sdexport.engines.artifacts import atomic_write_bytes, sha256_file
from sdexport.synth.generate import Output
from sdexport.synth.plan import Item
from sdexport.synth.records import make_record, record_line

log = logging.getLogger(__name__)

FORMATS = ("imagefolder", "webdataset")
_SUFFIX = {"image": ".png", "original": ".original.png", "mask": ".mask.png"}


class Sink(Protocol):
    """Stores samples durably and tells which recorded samples are still intact."""

    metadata_path: Path
    worker_safe: bool
    """True: ``store`` may run in any process (one file per sample); False: only in the driver's writer thread."""

    def location(self, item: Item) -> dict[str, str]:
        """Where the item's record must point (file name, tar) for the item to count as done."""

    def store(self, output: Output, info: Mapping[str, Any]) -> dict[str, Any]:
        """Write the sample's files durably; return its metadata record."""

    def intact(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records whose files are complete with their recorded hashes (repairing partial files on the way)."""

    def close(self) -> None:
        """Finish open files."""


class ImageFolderSink:
    """``out/train/<shard>/<key>.png`` (+ ``.original.png`` / ``.mask.png``) and ``out/train/metadata.jsonl``."""

    worker_safe = True

    def __init__(self, out: Path) -> None:
        self.split = out / "train"
        self.metadata_path = self.split / "metadata.jsonl"

    def location(self, item: Item) -> dict[str, str]:
        """``<shard>/<key>.png`` inside the train split."""
        return {"file_name": f"{item.shard_name}/{item.key}.png"}

    def store(self, output: Output, info: Mapping[str, Any]) -> dict[str, Any]:
        """Write each picture atomically (temporary file, fsync, rename)."""
        item = output.item
        names = {role: f"{item.shard_name}/{item.key}{_SUFFIX[role]}" for role in output.files}
        for role, data in output.files.items():
            atomic_write_bytes(self.split / names[role], data)
        return make_record(output, info, names)

    def intact(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Records whose every file exists with its recorded sha256; leftover temporary files are removed."""
        for stray in self.split.glob("*/.*.tmp"):
            stray.unlink(missing_ok=True)
        return [record for record in records if all(self._file_ok(record, role) for role in _SUFFIX)]

    def _file_ok(self, record: Mapping[str, Any], role: str) -> bool:
        prefix = "" if role == "image" else f"{role}_"
        name, digest = record.get(f"{prefix}file_name"), record.get(f"{prefix}sha256")
        if name is None:
            return role != "image"
        path = self.split / str(name)
        return digest is not None and path.is_file() and sha256_file(path) == digest

    def close(self) -> None:
        """Nothing stays open."""


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    return info, io.BytesIO(data)


def _tar_hashes(path: Path) -> dict[str, tuple[int, str]]:
    """Member name -> (end offset, sha256) of every complete member of a possibly truncated tar."""
    size = path.stat().st_size
    found: dict[str, tuple[int, str]] = {}
    with contextlib.suppress(tarfile.TarError, EOFError, OSError), tarfile.open(path, "r:") as tar:
        for member in tar:
            end = member.offset_data + member.size
            if end > size:
                break
            data = tar.extractfile(member)
            found[member.name] = (end, hashlib.sha256(data.read() if data else b"").hexdigest())
    return found


class WebDatasetSink:
    """``out/train-<shard>.tar`` with ``<key>.png`` (+ ``.original.png``, ``.mask.png``) and ``<key>.json`` per sample,
    the WebDataset naming convention; ``out/metadata.jsonl`` records each sample's tar and end offset."""

    worker_safe = False

    def __init__(self, out: Path) -> None:
        self.out = out
        self.metadata_path = out / "metadata.jsonl"
        self._tar: tarfile.TarFile | None = None
        self._name: str | None = None

    def _open(self, name: str) -> tarfile.TarFile:
        if self._name != name:
            self.close()
            path = self.out / name
            self.out.mkdir(parents=True, exist_ok=True)
            mode = "a" if path.is_file() and path.stat().st_size else "w"
            self._tar = tarfile.open(path, mode, format=tarfile.PAX_FORMAT)  # noqa: SIM115 (open across samples)
            self._name = name
        return self._tar  # type: ignore[return-value]

    def location(self, item: Item) -> dict[str, str]:
        """``<key>.png`` inside ``train-<shard>.tar``."""
        return {"file_name": f"{item.key}.png", "tar": f"train-{item.shard_name}.tar"}

    def store(self, output: Output, info: Mapping[str, Any]) -> dict[str, Any]:
        """Append the sample's members, flush and fsync the tar, then return its record (tar name, end offset)."""
        item = output.item
        names = {role: f"{item.key}{_SUFFIX[role]}" for role in output.files}
        record = make_record(output, info, names)
        tar = self._open(self.location(item)["tar"])
        for role, data in output.files.items():
            tar.addfile(*_member(names[role], data))
        tar.addfile(*_member(f"{item.key}.json", record_line(record)))
        tar.fileobj.flush()
        os.fsync(tar.fileobj.fileno())
        return {**record, "tar": self._name, "end": tar.offset}

    def intact(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per tar, the leading run of records whose members are complete with their hashes; the tar is cut after
        the last of them (dropping a partly written sample) and closed properly again."""
        by_tar: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            by_tar.setdefault(str(record.get("tar")), []).append(record)
        kept: list[dict[str, Any]] = []
        for path in sorted(self.out.glob("train-*.tar")):
            members, size = _tar_hashes(path), path.stat().st_size
            cut = 0
            for record in sorted(by_tar.get(path.name, []), key=lambda r: int(r.get("end", 0))):
                member = members.get(str(record["file_name"]))
                if member is None or member[1] != record.get("sha256") or not member[0] < int(record["end"]) <= size:
                    break
                kept.append(record)
                cut = int(record["end"])
            self._repair(path, cut)
        return kept

    @staticmethod
    def _repair(path: Path, cut: int) -> None:
        """Cut the tar after its last intact sample and write the end-of-archive blocks again."""
        if cut == 0:
            path.unlink()
            return
        with path.open("r+b") as f:
            f.truncate(cut)
            f.seek(cut)
            f.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # append mode finds the archive's end by these blocks
        tarfile.open(path, "a", format=tarfile.PAX_FORMAT).close()

    def close(self) -> None:
        """Close the open tar (writes its end-of-archive blocks)."""
        if self._tar is not None:
            self._tar.close()
        self._tar, self._name = None, None


def make_sink(kind: str, out: Path) -> Sink:
    """The sink of an output format (``imagefolder`` or ``webdataset``)."""
    if kind == "imagefolder":
        return ImageFolderSink(out)
    if kind == "webdataset":
        return WebDatasetSink(out)
    raise ValueError(f"format={kind!r} is not one of {list(FORMATS)}")


