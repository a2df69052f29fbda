"""Opening a compiled folder's engines with a registered backend; running them in slices that fit their batch range."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdexport.engines import artifacts, get_backend
from sdexport.engines.arrays import HOST, Arrays
from sdexport.engines.base import Engine
from sdexport.errors import ArtifactError
from sdexport.specs import ComponentSpec, ModelSpec
from sdexport.specs.families.base import VAE_COMPONENTS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComponentFiles:
    """What a backend needs to open one component: its spec, graph, engine profile and precision."""

    name: str
    spec: ComponentSpec
    graph: Path
    profile: Mapping[str, Mapping[str, list[int]]]
    precision: str
    record: Mapping[str, Any]
    size: int | None = None
    """Bytes of the component's listed files (its graphs and their weights; ``artifacts.component_bytes``); None:
    not known."""
    pixels: int | None = None
    """Height x width of the image the folder is built around (``artifacts.opt_pixels``); None: not known."""
    folder: Path | None = None
    """The compiled folder the component belongs to (for files its record names, e.g. a quantised IR)."""

    @property
    def max_batch(self) -> int:
        """The largest batch the engine accepts (axis 0 of its first input's max shape)."""
        return int(self.profile[self.spec.inputs[0].name]["max"][0])

    @property
    def cpu_batch(self) -> int | None:
        """The largest batch a CPU engine runs this component at (None: all it accepts): 1 for the VAE.

        The VAE's convolutions at image resolution gain nothing from a batch on a CPU and hold batch x the
        activations. ONNX Runtime at SD 1.5 256 px, batch 4, with the pipeline loaded, decodes in 11.4-14.8 s at
        once and 7.2-8.3 s image by image (benchmarks/README.md, "OpenVINO's mapped weights handed back; the VAE image
        by image").
        """
        return 1 if self.name in VAE_COMPONENTS else None

    def run_batch(self, engine: Engine) -> int:
        """The largest batch ``engine`` is called with for this component (``cpu_batch`` on a CPU engine)."""
        cpu = self.cpu_batch if getattr(engine, "on_cpu", False) else None
        return min(self.max_batch, cpu) if cpu else self.max_batch


Runner = Callable[[Mapping[str, Any]], dict[str, Any]]
"""Anything that runs a component on named arrays (an EngineRunner, or a test double)."""


def verify_folder(folder: Path, verify: bool = True) -> dict[str, Any]:
    """Read and verify the manifest exactly as ``sdexport info`` does (``artifacts.load_manifest``), without onnx."""
    return artifacts.load_manifest(folder, verify=verify)


def read_scheduler_config(folder: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The folder's scheduler config: a listed, hashed JSON object inside the folder (``manifest.scheduler_config``)."""
    relative = manifest.get("scheduler_config", artifacts.DEFAULT_SCHEDULER_CONFIG)
    path = artifacts.listed_path(folder, dict(manifest), relative, "scheduler_config")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not a readable JSON scheduler config ({exc}); rebuild the folder") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path} must hold a JSON object, not {type(config).__name__}; rebuild the folder")
    return config


def component_files(folder: Path, manifest: Mapping[str, Any], spec: ComponentSpec) -> ComponentFiles:
    """The ComponentFiles of ``spec.name`` in a verified folder."""
    record = manifest["components"].get(spec.name)
    if record is None:
        raise ArtifactError(f"{folder}: the manifest has no component {spec.name!r}; rebuild the folder")
    return ComponentFiles(spec.name, spec, artifacts.check_inside(folder, record["graph"]), record["profile"],
                          record.get("precision", "fp32"), record, artifacts.component_bytes(manifest, spec.name),
                          artifacts.opt_pixels(manifest), Path(folder))


def open_engine(component: ComponentFiles, backend: str, options: Mapping[str, Any]) -> Engine:
    """Open one component with the named registered backend (``sdexport.engines.backends()``)."""
    record = get_backend(backend)
    t0 = time.perf_counter()
    engine = record.open_component(component, options)
    log.debug("%s: opened with %s in %.2f s", component.name, backend, time.perf_counter() - t0)
    return engine


def open_engines(folder: Path, manifest: Mapping[str, Any], spec: ModelSpec, backend: str,
                 options: Mapping[str, Any]) -> dict[str, Engine]:
    """One engine per component of ``spec`` (in the spec's order), opened largest first.

    Opening a graph holds a transient beside its weights (ONNX Runtime's optimised copy of SDXL's UNet: about
    2.5 GB); opened first, it sits on no other component's weights: SDXL's load peaks at 13 GB instead of 15.5.
    """
    files = {name: component_files(folder, manifest, c) for name, c in spec.components.items()}
    opened = {name: open_engine(files[name], backend, options)
              for name in sorted(files, key=lambda n: -(files[n].size or 0))}
    return {name: opened[name] for name in files}


class EngineRunner:
    """Calls one engine, splitting the batch into slices of at most ``max_batch``; accumulates engine time.

    ``arrays`` is where the caller's arrays live. An engine whose ``array_device`` is those arrays takes and returns
    them directly (TensorRT with CuPy); any other engine gets host copies, and its outputs are put back. An engine
    with ``row_parallel = n > 1`` gets the batch in up to n slices at once, from n threads (``row_slices``).
    """

    def __init__(self, engine: Engine, max_batch: int, arrays: Arrays = HOST) -> None:
        self.engine = engine
        self.max_batch = max(1, int(max_batch))
        self.arrays = arrays
        self.native = arrays is HOST or getattr(engine, "array_device", None) is arrays
        self.row_parallel = max(1, int(getattr(engine, "row_parallel", 1)))
        self.seconds = 0.0
        self.calls = 0

    def _run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        if self.native:
            return self.engine.run(feeds)
        host = self.engine.run({k: self.arrays.get(v) for k, v in feeds.items()})
        return {k: self.arrays.put(v) for k, v in host.items()}

    def _run_slices(self, slices: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Outputs of each slice, in order: ``row_parallel`` threads each run every ``row_parallel``-th slice, the
        calling thread the first of them (one hand-off fewer than a pool of ``row_parallel`` threads)."""
        lanes = min(self.row_parallel, len(slices))
        if lanes == 1:
            return [self._run(part) for part in slices]
        pool = _row_pool(self.row_parallel - 1, os.getpid())
        others = [pool.submit(lambda lane: [self._run(part) for part in slices[lane::lanes]], lane)
                  for lane in range(1, lanes)]
        done = [[self._run(part) for part in slices[0::lanes]]] + [future.result() for future in others]
        return [done[i % lanes][i // lanes] for i in range(len(slices))]

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on ``feeds`` (all batched on axis 0); outputs concatenated back along axis 0."""
        t0 = time.perf_counter()
        total = next(iter(feeds.values())).shape[0]
        slices = row_slices(total, self.max_batch, self.row_parallel)
        self.calls += len(slices)
        if len(slices) == 1:
            out = self._run(feeds)
        else:
            parts = self._run_slices([{k: v[start:stop, ...] for k, v in feeds.items()} for start, stop in slices])
            out = {k: self.arrays.xp.concat([p[k] for p in parts], axis=0) for k in parts[0]}
        self.seconds += time.perf_counter() - t0
        return out


def row_slices(total: int, max_batch: int, row_parallel: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of the slices a batch of ``total`` rows runs in: at most ``max_batch`` rows each, and at least
    ``row_parallel`` slices when there are that many rows (so that each of ``row_parallel`` threads has one)."""
    size = min(max_batch, max(1, math.ceil(total / row_parallel)))
    return [(start, min(start + size, total)) for start in range(0, total, size)]


@functools.cache
def _row_pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """The threads that run a row-parallel engine's slices, shared by every runner with ``workers`` of them (one
    pool per process: ``pid`` keeps a forked child from using its parent's threads, which it does not have)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdexport-rows")
