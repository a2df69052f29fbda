"""Row validation: a table row -> a Job with every generation parameter resolved, or a RowError naming the value."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdexport.runtime.args import DEFAULTS
from sdexport.runtime.noise import MAX_SEED
from sdexport.runtime.schedulers.registry import resolve_name
from sdexport.synth.table import TableRow

INPUT_COLUMNS = ("id", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale",
                 "scheduler", "image", "mask")
"""The columns synth reads; any other column is carried into the metadata untouched."""

OUTPUT_FIELDS = ("file_name", "original_file_name", "mask_file_name", "sha256", "original_sha256", "mask_sha256",
                 "key", "row", "index", "task", "item_hash", "model", "family", "source_hash", "loras",
                 "sdexport_version", "tar", "end")
"""Metadata fields synth writes itself: an extra column may not use these names."""

TASKS = ("auto", "txt2img", "img2img", "inpaint")
_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")


class RowProblem(ValueError):
    """One value of a row is invalid (the message names the column and what is allowed)."""


@dataclass(frozen=True)
class RowError:
    """A row that is skipped: its number, its id when it had a usable one, and why."""

    row: int
    error: str
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The errors.jsonl line."""
        return {"row": self.row, "id": self.id, "error": self.error}


@dataclass(frozen=True)
class Defaults:
    """The flags' values for columns a row leaves empty (None: the folder's / the Pipeline's default)."""

    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int = DEFAULTS["num_inference_steps"]
    guidance_scale: float | None = None
    scheduler: str | None = None


@dataclass(frozen=True)
class Limits:
    """What the compiled folder accepts: pixel ranges (min, opt, max), their multiple, and whether it inpaints only."""

    height: tuple[int, int, int]
    width: tuple[int, int, int]
    multiple: int
    inpaint_only: bool
    max_seed: int = MAX_SEED


@dataclass(frozen=True)
class Job:
    """A valid row with every parameter resolved; ``image`` / ``mask`` are absolute paths."""

    row: int
    id: str
    prompt: str
    negative_prompt: str | None
    seed: int | None
    width: int
    height: int
    steps: int
    guidance_scale: float | None
    scheduler: str | None
    task: str
    image: str | None = None
    mask: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (shipped to Ray workers)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        """Inverse of ``to_dict``."""
        return cls(**dict(data))


def _given(values: Mapping[str, Any], name: str) -> bool:
    value = values.get(name)
    return value is not None and not (isinstance(value, str) and not value.strip())


def _integer(value: Any, name: str, low: int, high: int) -> int:
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        raise RowProblem(f"{name}={value!r} is not allowed; allowed: integers {low}..{high}")
    return number


def _real(value: Any, name: str, low: float, high: float) -> float:
    try:
        number = float(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or not low <= number <= high:
        raise RowProblem(f"{name}={value!r} is not allowed; allowed: numbers {low}..{high}")
    return number


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RowProblem(f"{name}={value!r} is not allowed; expected non-empty text")
    return value


def _size(value: Any, name: str, allowed: Sequence[int], multiple: int) -> int:
    low, _, high = allowed
    size = _integer(value, name, low, high)
    if size % multiple:
        raise RowProblem(f"{name}={value!r} is not allowed: this folder takes {name} {low}..{high} px in multiples "
                         f"of {multiple}")
    return size


def _picture(value: Any, name: str, base: Path) -> tuple[str, tuple[int, int]]:
    """An image path relative to the table's folder -> (absolute path, (height, width)); checked readable."""
    from PIL import Image, UnidentifiedImageError

    path = (base / _text(value, name)).resolve()
    try:
        with Image.open(path) as picture:
            picture.load()
            return str(path), (picture.height, picture.width)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise RowProblem(f"{name}={value!r}: cannot read {path} as an image: {exc}") from exc


def _task(values: Mapping[str, Any], wanted: str, limits: Limits) -> str:
    has_image, has_mask = _given(values, "image"), _given(values, "mask")
    if has_mask and not has_image:
        raise RowProblem("mask is given without image: inpainting needs both columns")
    task = wanted if wanted != "auto" else "inpaint" if has_mask else "img2img" if has_image else "txt2img"
    if task == "inpaint" and not has_mask:
        raise RowProblem("the inpaint task needs the image and mask columns (paths relative to the table's folder)")
    if task == "img2img" and not has_image:
        raise RowProblem("the img2img task needs the image column (a path relative to the table's folder)")
    if task == "txt2img" and has_image:
        raise RowProblem("the txt2img task takes no image column; use --task auto, img2img or inpaint")
    if limits.inpaint_only and task != "inpaint":
        raise RowProblem(f"this is an inpainting folder: the row needs image and mask columns (task {task!r})")
    return task


def _default_size(given: tuple[int, int] | None, limits: Limits) -> tuple[int, int]:
    """An input picture's size rounded down to the multiple (the Pipeline's rule), else the folder's optimum."""
    if given is None:
        return limits.height[1], limits.width[1]
    return tuple(max(limits.multiple, s - s % limits.multiple) for s in given)  # type: ignore[return-value]


def check_row(values: Mapping[str, Any], number: int, base: Path, defaults: Defaults, limits: Limits,
              task: str = "auto", max_index: int = 1) -> Job:
    """Validate one row; raise RowProblem naming the first bad value."""
    extras = {k: v for k, v in values.items() if k not in INPUT_COLUMNS}
    reserved = sorted(set(extras) & set(OUTPUT_FIELDS))
    if reserved:
        raise RowProblem(f"column(s) {reserved} are written by synth itself; rename them")
    row_id = str(values["id"]).strip() if _given(values, "id") else f"row{number:06d}"
    if not _ID.fullmatch(row_id):
        raise RowProblem(f"id={values.get('id')!r} is not allowed; use 1-100 letters, digits, '_' or '-'")
    if not _given(values, "prompt"):
        raise RowProblem("prompt is missing or empty: every row needs a prompt")
    prompt = _text(values["prompt"], "prompt")
    chosen = _task(values, task, limits)
    image = mask = None
    size = None
    if chosen != "txt2img":
        image, size = _picture(values["image"], "image", base)
    if chosen == "inpaint":
        mask, _ = _picture(values["mask"], "mask", base)
    default_h, default_w = _default_size(size, limits)
    pick = {k: values[k] if _given(values, k) else getattr(defaults, k) for k in
            ("negative_prompt", "width", "height", "steps", "guidance_scale", "scheduler")}
    scheduler = None if pick["scheduler"] is None else _text(pick["scheduler"], "scheduler")
    if scheduler is not None:
        try:
            scheduler = resolve_name(scheduler).cls.class_name
        except ValueError as exc:
            raise RowProblem(f"scheduler={scheduler!r}: {exc}") from exc
    return Job(
        row=number, id=row_id, prompt=prompt,
        negative_prompt=None if pick["negative_prompt"] is None else str(pick["negative_prompt"]),
        seed=None if not _given(values, "seed") else _integer(values["seed"], "seed", 0, limits.max_seed - max_index),
        width=_size(default_w if pick["width"] is None else pick["width"], "width", limits.width, limits.multiple),
        height=_size(default_h if pick["height"] is None else pick["height"], "height", limits.height,
                     limits.multiple),
        steps=_integer(pick["steps"], "steps", 1, 1000),
        guidance_scale=None if pick["guidance_scale"] is None else _real(pick["guidance_scale"], "guidance_scale",
                                                                         0.0, 1e4),
        scheduler=scheduler, task=chosen, image=image, mask=mask, extras=extras)


def check_rows(rows: Sequence[TableRow], base: Path, defaults: Defaults, limits: Limits, task: str = "auto",
               max_index: int = 1) -> tuple[list[Job], list[RowError]]:
    """Every row checked: the valid jobs in table order and the errors (bad values, duplicate ids)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {list(TASKS)}")
    jobs: list[Job] = []
    errors: list[RowError] = []
    seen: dict[str, int] = {}
    for row in rows:
        if row.values is None:
            errors.append(RowError(row.number, row.error or "unreadable row"))
            continue
        try:
            job = check_row(row.values, row.number, base, defaults, limits, task, max_index)
        except RowProblem as exc:
            raw = row.values.get("id")
            errors.append(RowError(row.number, str(exc), None if raw is None else str(raw)))
            continue
        if job.id in seen:
            errors.append(RowError(row.number, f"id={job.id!r} is already used by row {seen[job.id]}; ids must be "
                                   "unique", job.id))
            continue
        seen[job.id] = row.number
        jobs.append(job)
    return jobs, errors
