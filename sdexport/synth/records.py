"""Metadata records: one JSON line per finished sample, with the generation parameters, hashes and the folder's
source, LoRAs and sdexport version; and reading them back for a resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdexport import __version__
from sdexport.synth.generate import Output
from sdexport.synth.plan import Item

log = logging.getLogger(__name__)


def folder_info(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What every record says about the compiled folder: source id and hash, family, LoRAs, sdexport version."""
    source = manifest.get("source", {})
    loras = [{"name": Path(str(r.get("path", ""))).name, "weight": r.get("weight"), "sha256": r.get("sha256")}
             for r in manifest.get("loras", [])]
    return {"model": source.get("id"), "family": manifest.get("model", {}).get("family"),
            "source_hash": source.get("hash"), "build_key": manifest.get("build_key"), "loras": loras,
            "sdexport_version": __version__}


def item_hash(item: Item, info: Mapping[str, Any]) -> str:
    """A fingerprint of everything that decides an item's pixels: row values, seed, index and the folder's build."""
    job = {k: v for k, v in item.job.to_dict().items() if k not in ("row", "extras")}
    data = {"job": job, "seed": item.seed, "index": item.index, "build": info.get("build_key"),
            "source": info.get("source_hash")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_record(output: Output, info: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The metadata line of a sample; ``names`` maps each stored role (image, original, mask) to its file name."""
    item, job = output.item, output.item.job
    record: dict[str, Any] = {"file_name": names["image"]}
    for role in ("original", "mask"):
        if role in names:
            record[f"{role}_file_name"] = names[role]
    record.update({
        "key": item.key, "id": job.id, "row": job.row, "index": item.index, "task": job.task, "prompt": job.prompt,
        "negative_prompt": job.negative_prompt, "seed": item.seed, "width": job.width, "height": job.height,
        "steps": job.steps, **output.parameters,
    })
    record["sha256"] = hashlib.sha256(output.files["image"]).hexdigest()
    for role in ("original", "mask"):
        if role in output.files:
            record[f"{role}_sha256"] = hashlib.sha256(output.files[role]).hexdigest()
    record.update({k: v for k, v in info.items() if k != "build_key"})
    record["item_hash"] = item_hash(item, info)
    record.update(job.extras)
    return record


def read_records(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a metadata file (a line cut short by a kill is dropped)."""
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is incomplete (an interrupted run); its sample is redone", path, number)
                continue
            if isinstance(value, dict) and "key" in value:
                records.append(value)
    return records


def record_line(record: Mapping[str, Any]) -> bytes:
    """One metadata line (compact JSON, keys in record order, UTF-8)."""
    return (json.dumps(dict(record), ensure_ascii=False, default=str) + "\n").encode()


class MetadataLog:
    """The metadata file: lines appended durably (write, flush, fsync) only after their sample's files are."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one line and make it durable."""
        with self.path.open("ab") as f:
            f.write(record_line(record))
            f.flush()
            os.fsync(f.fileno())
