"""Scale-out on Ray Data: engine batches mapped over an actor pool holding one Pipeline each (one per GPU).

The driver reads and checks the table, plans and resumes exactly like a local run (ids, grouping and resume need the
whole table); the workers generate and, for the imagefolder format, write the image files themselves; the driver
appends the metadata lines. Results come back in plan order, so the output equals a local run byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdexport.synth.config import RayOptions
from sdexport.synth.generate import GENERATION_ERRORS, Failure, encode, run_batch
from sdexport.synth.plan import Batch
from sdexport.synth.sinks import ImageFolderSink
from sdexport.synth.table import SynthError

if TYPE_CHECKING:
    from sdexport.synth.run import Prepared

log = logging.getLogger(__name__)

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
"""Set (unless already set) for ``--ray local``: every Ray process binds to 127.0.0.1, no usage reporting."""


class GeneratorActor:
    """A Ray Data actor: loads the Pipeline once, then turns rows of serialised batches into pickled results."""

    def __init__(self, folder: str, backend: str, engine_options: Mapping[str, Any], out: str | None,
                 info: Mapping[str, Any]) -> None:
        from sdexport.runtime.pipeline import Pipeline

        self.pipe = Pipeline.load(folder, backend=backend, verify=False, engine_options=dict(engine_options))
        self.sink = ImageFolderSink(Path(out)) if out is not None else None
        self.info = dict(info)

    def _results(self, text: str) -> list[Any]:
        data = json.loads(text)
        batch, skip = Batch.from_dict(data["batch"]), set(data["skip"])
        try:
            samples = run_batch(self.pipe, batch)
        except GENERATION_ERRORS as exc:
            return [Failure.of(batch, exc)]
        outputs = [encode(s) for s in samples if s.item.key not in skip]
        if self.sink is None:
            return outputs  # stored by the driver's writer thread (one tar at a time)
        return [self.sink.store(output, self.info) for output in outputs]

    def __call__(self, rows: Mapping[str, Any]) -> dict[str, list[bytes]]:
        """``{"batch": [json, ...]}`` -> ``{"payload": [pickled Output / record / Failure, ...]}``."""
        return {"payload": [pickle.dumps(r) for text in rows["batch"] for r in self._results(str(text))]}


def _connect(options: RayOptions) -> bool:
    """Attach to (or start) Ray unless this process already did; True when started here (and to shut down)."""
    try:
        import ray
    except ImportError as exc:
        raise SynthError("--ray needs Ray Data: pip install 'sdexport[ray]'") from exc
    if ray.is_initialized():
        return False
    if options.address == "local":
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=options.address, log_to_driver=False)
    return True


def _workers(options: RayOptions) -> int:
    import ray

    if options.workers is not None:
        if options.workers < 1:
            raise SynthError(f"workers={options.workers} is not allowed; it must be >= 1")
        return options.workers
    if options.gpus_per_worker > 0:
        return max(1, int(ray.cluster_resources().get("GPU", 0) // options.gpus_per_worker))
    return 1


def run_on_ray(prep: Prepared, batches: list[Batch], put: Callable[[Any], None]) -> None:
    """Generate ``batches`` on Ray Data and hand every result to ``put`` (the driver's writer thread), in order."""
    options = prep.config.ray
    if options is None:
        raise ValueError("run_on_ray needs a config with ray options (SynthConfig.ray)")
    started = _connect(options)
    try:
        import ray

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        items = [{"batch": json.dumps({"batch": b.to_dict(),
                                       "skip": [i.key for i in b.items if i.key in prep.done]})} for b in batches]
        if not items:
            return
        config = prep.config
        out = str(config.out.resolve()) if prep.sink.worker_safe else None
        workers = _workers(options)
        log.info("synth on Ray: %d batches over %d actor(s) (%s GPU, %s CPU each)", len(items), workers,
                 options.gpus_per_worker, options.cpus_per_worker)
        dataset = ray.data.from_items(items).map_batches(
            GeneratorActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=options.gpus_per_worker or None, num_cpus=options.cpus_per_worker,
            fn_constructor_kwargs={"folder": str(config.folder.resolve()), "backend": config.backend,
                                   "engine_options": config.engine_options, "out": out, "info": prep.info})
        for row in dataset.iter_rows():
            put(pickle.loads(row["payload"]))
    finally:
        if started:
            import ray

            ray.shutdown()
