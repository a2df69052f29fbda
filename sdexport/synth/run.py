"""A synthesis run: read and check the table, plan, skip what is already on disk, generate, write, summarise."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdexport.engines.artifacts import atomic_write_bytes
from sdexport.runtime.backends import verify_folder
from sdexport.specs import ModelSpec, ShapeRanges
from sdexport.synth.config import Summary, SynthConfig
from sdexport.synth.generate import GENERATION_ERRORS, Failure, Output, Sample, encode, run_batch
from sdexport.synth.plan import Batch, Plan, make_plan
from sdexport.synth.records import MetadataLog, folder_info, item_hash, read_records, record_line
from sdexport.synth.rows import TASKS, Limits, RowError, check_rows
from sdexport.synth.sinks import FORMATS, Sink, make_sink
from sdexport.synth.table import SynthError, read_table

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(images_done, images_total)`` after every durable image (images from earlier runs count as done)."""


@dataclass
class Prepared:
    """A run ready to go: the checked jobs and errors, the plan, the sink and what is already done."""

    config: SynthConfig
    info: dict[str, Any]
    rows: int
    errors: list[RowError]
    plan: Plan
    sink: Sink
    done: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def pending(self) -> list[Batch]:
        """Batches with at least one image not done yet (regenerated whole, so their pixels never change)."""
        return [b for b in self.plan.batches if any(item.key not in self.done for item in b.items)]


def _check_config(config: SynthConfig, ranges: ShapeRanges) -> int:
    """The engine batch size; raise SynthError naming a bad flag."""
    if config.format not in FORMATS:
        raise SynthError(f"format={config.format!r} is not one of {list(FORMATS)}")
    if config.task not in TASKS:
        raise SynthError(f"task={config.task!r} is not one of {list(TASKS)}")
    for name in ("per_prompt", "shard_size"):
        if getattr(config, name) < 1:
            raise SynthError(f"{name}={getattr(config, name)!r} is not allowed; it must be >= 1")
    low, opt, high = ranges.batch
    batch = opt if config.batch is None else config.batch
    if not low <= batch <= high:
        raise SynthError(f"batch={batch} is not allowed: {config.folder} was built for {low}..{high} images per call "
                         f"(batch range {tuple(ranges.batch)})")
    return batch


def _done(plan: Plan, sink: Sink, info: dict[str, Any], verify: bool) -> dict[str, dict[str, Any]]:
    """Planned items whose record matches (same parameters, same place) and, with ``verify``, whose files hash."""
    records = read_records(sink.metadata_path)
    if verify:
        records = sink.intact(records)
    planned = {item.key: item for item in plan.items}
    done: dict[str, dict[str, Any]] = {}
    for record in records:
        item = planned.get(str(record.get("key")))
        if item is None or record.get("item_hash") != item_hash(item, info):
            continue
        if all(record.get(k) == v for k, v in sink.location(item).items()):
            done[item.key] = record
    return done


def prepare(config: SynthConfig) -> Prepared:
    """Check the folder, the flags and every row; plan; find the images already done (verifying their hashes)."""
    manifest = verify_folder(config.folder, verify=config.verify)
    spec = ModelSpec.from_dict(manifest["model"])
    ranges = ShapeRanges.from_dict(manifest["shape_ranges"])
    batch = _check_config(config, ranges)
    limits = Limits(ranges.height, ranges.width, spec.vae_scale_factor, spec.inpaint)
    rows = read_table(config.prompts)
    jobs, errors = check_rows(rows, config.prompts.resolve().parent, config.defaults, limits, config.task,
                              config.per_prompt)
    plan = make_plan(jobs, config.per_prompt, batch, config.seed, config.shard_size)
    sink = make_sink(config.format, config.out)
    info = folder_info(manifest)
    done = _done(plan, sink, info, verify=not config.dry_run)
    return Prepared(config, info, len(rows), errors, plan, sink, done)


def _write_lines(path: Any, lines: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, b"".join(record_line(line) for line in lines))


def _write_metadata(prep: Prepared) -> None:
    """The metadata file rewritten with the done records in plan order (no duplicates, no stale lines)."""
    order = [prep.done[item.key] for item in prep.plan.items if item.key in prep.done]
    _write_lines(prep.sink.metadata_path, order)


class _Consumer:
    """The writer thread's work: encode, store, record; count and report progress."""

    def __init__(self, prep: Prepared, progress: Progress | None) -> None:
        self.prep = prep
        self.log = MetadataLog(prep.sink.metadata_path)
        self.progress = progress
        self.written = 0
        self.failures: list[RowError] = []

    def __call__(self, message: Any) -> None:
        """Handle one Sample, Output, stored record or Failure."""
        prep = self.prep
        if isinstance(message, Failure):
            if prep.config.fail_fast:
                raise SynthError(f"row {message.rows[0][0]}: {message.message}")
            self.failures += [RowError(row, message.message, row_id) for row, row_id in message.rows]
            return
        key = message.item.key if isinstance(message, Sample | Output) else str(message["key"])
        if key in prep.done:
            return  # a finished image of a batch regenerated for its unfinished companions
        if isinstance(message, Sample):
            message = encode(message)
        record = prep.sink.store(message, prep.info) if isinstance(message, Output) else dict(message)
        self.log.append(record)
        prep.done[key] = record
        self.written += 1
        if self.progress is not None:
            self.progress(len(prep.done), len(prep.plan.items))


def _run_local(prep: Prepared, batches: list[Batch], put: Callable[[Any], None]) -> None:
    """Generate every batch with one Pipeline in this process; samples go to the writer thread."""
    from sdexport.runtime.pipeline import Pipeline

    config = prep.config
    pipe = Pipeline.load(config.folder, backend=config.backend, verify=False, engine_options=config.engine_options)
    for batch in batches:
        try:
            samples = run_batch(pipe, batch)
        except GENERATION_ERRORS as exc:
            put(Failure.of(batch, exc))
            continue
        for sample in samples:
            put(sample)


def _execute(prep: Prepared, consumer: _Consumer, batches: list[Batch]) -> None:
    from sdexport.synth.writer import WriterThread

    writer = WriterThread(consumer)
    try:
        if prep.config.ray is not None:
            from sdexport.synth.ray_runner import run_on_ray

            run_on_ray(prep, batches, writer.put)
        else:
            _run_local(prep, batches, writer.put)
    finally:
        try:
            writer.close()
        finally:
            prep.sink.close()


def synthesize(config: SynthConfig, progress: Progress | None = None) -> Summary:
    """Run (or resume) a synthesis; bad rows go to ``errors.jsonl`` and never stop it unless ``fail_fast``."""
    t0 = time.perf_counter()
    prep = prepare(config)
    summary = Summary(prep.rows, len(prep.errors), len(prep.plan.items), len(prep.done), plan=prep.plan.describe())
    if config.dry_run:
        return summary
    config.out.mkdir(parents=True, exist_ok=True)
    errors_path = config.out / "errors.jsonl"
    _write_lines(errors_path, [e.to_dict() for e in prep.errors])
    if prep.errors and config.fail_fast:
        first = prep.errors[0]
        raise SynthError(f"{config.prompts} row {first.row}: {first.error} (--fail-fast; all bad rows are in "
                         f"{errors_path})")
    batches = prep.pending
    _write_metadata(prep)
    if progress is not None:
        progress(len(prep.done), len(prep.plan.items))
    consumer = _Consumer(prep, progress)
    log.info("synth: %d of %d images to make in %d batches", len(prep.plan.items) - len(prep.done),
             len(prep.plan.items), len(batches))
    _execute(prep, consumer, batches)
    _write_metadata(prep)
    _write_lines(errors_path, [e.to_dict() for e in sorted(prep.errors + consumer.failures, key=lambda e: e.row)])
    summary.written, summary.failed = consumer.written, len(prep.plan.items) - len(prep.done)
    summary.bad_rows += len({e.row for e in consumer.failures})
    summary.seconds = time.perf_counter() - t0
    return summary
