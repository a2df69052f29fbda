"""Seeded mutations of a compiled folder and how sdexport took each: refused, accepted unchanged, or a bad outcome.

Bad outcomes: ``tampered`` (accepted, and the image differs from the untouched folder's), ``crash`` (an exception
that is not an SdexportError), ``disagree`` (``info`` and ``Pipeline.load`` judged differently), ``hang``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdexport.engines.artifacts import describe, load_manifest
from sdexport.errors import SdexportError
from sdexport.runtime.pipeline import Pipeline

BAD = ("tampered", "crash", "disagree", "hang")
ODD_VALUES: tuple[Any, ...] = (None, True, 0, -1, 1e308, "x", "../../etc/passwd", "/etc/passwd", [], {}, [None])
HANG_SECONDS = 20


@dataclass
class Outcome:
    """One mutation and what came of it."""

    seed: int
    mutation: str
    result: str
    detail: str


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a JSON value (objects and lists), parents before children."""
    out: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, sub in items:
        out.append((*prefix, key))
        out.extend(_json_paths(sub, (*prefix, key)))
    return out


def _edit_manifest(folder: Path, rng: random.Random, delete: bool) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    path = rng.choice(_json_paths(manifest))
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
        what = "deleted"
    else:
        value = rng.choice([v for v in ODD_VALUES if type(v) is not type(parent[path[-1]])])
        parent[path[-1]] = value
        what = f"= {value!r}"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return f"manifest {'.'.join(map(str, path))} {what}"


def _flip(folder: Path, rng: random.Random) -> str:
    path = rng.choice(_files(folder))
    data = bytearray(path.read_bytes())
    if not data:
        return _delete(folder, rng)
    at = rng.randrange(len(data))
    data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"flip {path.relative_to(folder)}@{at}"


def _truncate(folder: Path, rng: random.Random) -> str:
    path = rng.choice(_files(folder))
    size = path.stat().st_size
    keep = rng.randrange(size) if size else 0
    os.truncate(path, keep)
    return f"truncate {path.relative_to(folder)} to {keep}"


def _delete(folder: Path, rng: random.Random) -> str:
    path = rng.choice(_files(folder))
    path.unlink()
    return f"delete {path.relative_to(folder)}"


def _stray(folder: Path, rng: random.Random) -> str:
    where = rng.choice([p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")] + [folder])
    name = rng.choice(["model.onnx.data", "extra.onnx", "notes.txt", "vocab.json.bak", "x.json"])
    (where / name).write_bytes(b"stray")
    return f"stray {(where / name).relative_to(folder)}"


def _symlink(folder: Path, rng: random.Random) -> str:
    path = rng.choice(_files(folder))
    outside = folder.parent / f"outside-{path.name}"
    shutil.copyfile(path, outside)
    path.unlink()
    if rng.random() < 0.2:
        os.symlink(path.name, path)  # a loop
        return f"symlink loop {path.relative_to(folder)}"
    os.symlink(outside, path)
    return f"symlink {path.relative_to(folder)} -> outside copy"


MUTATIONS: dict[str, Callable[[Path, random.Random], str]] = {
    "flip": _flip, "truncate": _truncate, "delete": _delete, "stray": _stray, "symlink": _symlink,
    "manifest-delete": lambda f, r: _edit_manifest(f, r, delete=True),
    "manifest-value": lambda f, r: _edit_manifest(f, r, delete=False),
}


def generate(folder: Path) -> np.ndarray:
    """The folder's image for a fixed request (what a mutation must not change unnoticed)."""
    pipe = Pipeline.load(folder)
    return np.asarray(pipe("a red cube", num_inference_steps=2, seed=3, output_type="np").images)


def _judge(folder: Path, reference: np.ndarray) -> tuple[str, str]:
    try:
        describe(folder, load_manifest(folder, verify=True))
        info: str | None = None
    except SdexportError as exc:
        info = str(exc)
    try:
        image = generate(folder)
    except SdexportError as exc:
        return ("refused", str(exc)[:200]) if info is not None else ("disagree", f"info verified; load: {exc}")
    if info is not None:
        return "disagree", f"load accepted; info: {info}"
    same = image.shape == reference.shape and np.array_equal(image, reference)
    return ("accepted", "same image") if same else ("tampered", "accepted with a different image")


def _alarm(signum: int, frame: Any) -> None:
    raise TimeoutError(f"no answer in {HANG_SECONDS} s")


def run_case(source: Path, work: Path, seed: int, reference: np.ndarray) -> Outcome:
    """Copy ``source``, apply mutation ``seed`` and judge it."""
    rng = random.Random(seed)
    kind = rng.choice(sorted(MUTATIONS))
    case = work / f"case-{seed}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(source, case, ignore=shutil.ignore_patterns(".build", ".lock"))
    mutation = MUTATIONS[kind](case, rng)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    try:
        result, detail = _judge(case, reference)
    except TimeoutError as exc:
        result, detail = "hang", str(exc)
    except Exception as exc:  # noqa: BLE001 - what the fuzz looks for
        result, detail = "crash", f"{type(exc).__name__}: {exc}"[:300]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return Outcome(seed, mutation, result, detail)


def fuzz(source: Path, work: Path, seeds: range) -> list[Outcome]:
    """Run every mutation seed against copies of ``source``."""
    reference = generate(source)
    return [run_case(source, work, seed, reference) for seed in seeds]
