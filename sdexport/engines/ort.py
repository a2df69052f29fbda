"""ONNX Runtime engine: one InferenceSession per component, CPU by default, GPU providers on request.

Declares the "onnxruntime" backend (the default: it needs nothing beyond sdexport's own dependencies).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _state

from sdexport.engines.artifacts import fused_graph
from sdexport.engines.memory import release_heap
from sdexport.engines.registry import Backend, BackendStatus, Option, register_backend
from sdexport.errors import ArtifactError
from sdexport.specs import TensorSpec
from sdexport.specs.families.base import VAE_COMPONENTS

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
ARENAS = ("auto", "on", "off")
"""Values of the ``arena`` option: the CPU memory arena per component (auto), or on / off for every component."""
PARALLEL = ("auto", "threads", "rows")
"""Values of the ``parallel`` option: how a component uses the cores (see ``row_parallel_for``)."""
ROWS_BELOW = 64 * 2**20
"""``parallel=auto`` runs a component's rows in parallel when its files are smaller than this (the tiny presets)."""


def session_options(threads: int | None = None, arena: bool = True) -> ort.SessionOptions:
    """sdexport's default session options: full graph optimisation, intra-op threads = cores, CPU memory arena on
    unless told otherwise, threads stop spinning when a run ends.

    The engine shrinks the arena after every run (``run_options``), so a component's arena does not hold its peak
    while the next component runs.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads if threads is not None else (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    # Measured (benchmarks/README.md, "Fused attention and the memory arena", SD 1.5 at 512x512): arena on and
    # shrunk after each run, the fused UNet call is 1.2x faster than with the arena off and peaks 265 MiB lower.
    opts.enable_cpu_mem_arena = arena
    # Each session has its own intra-op pool whose threads spin-wait after a run; the UNet's spinning threads then
    # take the cores from the scheduler step, the next component and the next call. Spin within a run (the UNet's
    # many small ops need it), stop when it ends: tiny-sd15 at 4 steps 2-4x faster (benchmarks/README.md,
    # "Threads that stop spinning, weights in data files, the heap trimmed").
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.log_severity_level = 3
    return opts


VAE_ARENA_PIXELS = 512 * 512
"""``auto`` gives the VAE the arena on folders built around images up to this area (height x width at their opt)."""


def arena_for(component: str, arena: str = "auto", pixels: int | None = None) -> bool:
    """Whether ``component``'s session gets the CPU memory arena under the ``arena`` option (see ``ARENAS``).

    ``auto`` keeps it for the UNet and text encoders (faster), and for the VAE only on folders built around images
    of at most ``VAE_ARENA_PIXELS`` (``pixels``: their opt height x width; None, unknown: off). Without the arena
    the first decode of each new size page-faults every activation afresh (later ones reuse ONNX Runtime's memory
    pattern): SD 1.5's decoder, first call, AMD EPYC, takes 5.01 s at 256 px without it and 3.55 s with it
    (peaking 173 MiB lower), 20.6 vs 15.5 s at 512 px (+61 MiB). At 768 px its power-of-two chunks hold 1.4 GB
    more than the tensors need (SDXL's decoder: 3791 against 2453 MiB), where an SDXL folder's peak is the decode:
    folders built around larger images keep it off (benchmarks/README.md, "The VAE and the memory arena").
    """
    if arena not in ARENAS:
        raise ValueError(f"onnxruntime option arena={arena!r} is not one of {list(ARENAS)}")
    if arena != "auto":
        return arena == "on"
    return component not in VAE_COMPONENTS or (pixels is not None and pixels <= VAE_ARENA_PIXELS)


def row_parallel_for(size: int | None, parallel: str = "auto", threads: int | None = None,
                     providers: Sequence[Any] | None = None) -> int:
    """How many slices of a batch the component runs at once, each on one single-threaded run (1: one run at a
    time on ``threads`` intra-op threads).

    ``rows`` gives each core a slice of the batch: no hand-offs between threads inside an op, which dominate
    networks this small (tiny-sdxl's UNet at batch 4 with CFG: 6.7 ms a call so against 9.2 ms on two intra-op
    threads; benchmarks/README.md, "Rows in parallel"). ``auto`` picks it for components of ``size`` bytes below
    ``ROWS_BELOW`` (never for a size not known: None); a full-size network keeps its intra-op threads, which a call
    with fewer rows than cores (the VAE image by image, a UNet without CFG) would otherwise lose. CPU only.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"onnxruntime option parallel={parallel!r} is not one of {list(PARALLEL)}")
    cores = threads if threads is not None else (os.cpu_count() or 1)
    on_cpu = provider_names(providers or [CPU]) == [CPU]
    rows = parallel == "rows" or (parallel == "auto" and size is not None and size < ROWS_BELOW)
    return cores if rows and on_cpu and cores > 1 else 1


def run_options(options: ort.SessionOptions, providers: Sequence[str]) -> ort.RunOptions:
    """Per-run options: shrink the CPU arena back after each run when the session has one."""
    run = ort.RunOptions()
    if options.enable_cpu_mem_arena and CPU in providers:
        run.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return run


def provider_names(providers: Sequence[Any]) -> list[str]:
    """Provider names from a providers list whose entries are names or (name, options) pairs."""
    return [p[0] if isinstance(p, tuple | list) else p for p in providers]


def check_providers(requested: Sequence[Any], granted: Sequence[str], graph: Path) -> list[str]:
    """Compare what a session was asked for with what it got; return the providers it silently dropped."""
    dropped = [p for p in provider_names(requested) if p not in granted]
    if dropped:
        log.warning(
            "%s: ONNX Runtime did not enable %s (it runs on %s). Install onnxruntime-gpu with matching CUDA / "
            "TensorRT libraries, or run `sdexport doctor`", graph, ", ".join(dropped), ", ".join(granted)
        )
    return dropped


# What ONNX Runtime raises for a graph it cannot load (bad bytes, bad external data, unknown ops...).
_LOAD_ERRORS = tuple(getattr(_state, n) for n in ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf",
                                                  "NoSuchFile", "NotImplemented", "RuntimeException")
                     if hasattr(_state, n))


def _open_session(graph: Path, opts: ort.SessionOptions, providers: Sequence[Any],
                  initializer_overrides: Mapping[str, np.ndarray] | None) -> ort.InferenceSession:
    """An InferenceSession on ``graph``; ONNX Runtime's load errors become an ArtifactError naming the graph."""
    try:
        if initializer_overrides:
            # SessionOptions.add_initializer is ignored wherever graph optimisation touches the weight, so the
            # overridden weights are written into the model bytes instead.
            from sdexport.engines.lora import ort_session

            return ort_session(graph, initializer_overrides, opts, providers)
        return ort.InferenceSession(str(graph), sess_options=opts, providers=list(providers))
    except _LOAD_ERRORS as exc:
        raise ArtifactError(f"ONNX Runtime cannot load {graph}: {str(exc).strip()[:300]}; rebuild the folder") from exc


class OrtEngine:
    """A component run by ONNX Runtime, behind the Engine protocol."""

    def __init__(
        self,
        name: str,
        graph: Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        providers: Sequence[Any] | None = None,
        options: ort.SessionOptions | None = None,
        initializer_overrides: Mapping[str, np.ndarray] | None = None,
        fused: bool = True,
    ) -> None:
        self.name = name
        self.requested = list(providers or [CPU])
        # TensorRT's provider would split the graph at every MultiHeadAttention node: it gets the portable graph.
        fused = fused and "TensorrtExecutionProvider" not in provider_names(self.requested)
        self.graph = fused_graph(graph) if fused else Path(graph)
        self.inputs = inputs
        self.outputs = outputs
        opts = options or session_options()
        self.options = opts
        self.session = _open_session(self.graph, opts, self.requested, initializer_overrides)
        release_heap()
        self.providers = self.session.get_providers()
        self.dropped_providers = check_providers(self.requested, self.providers, self.graph)
        self.on_cpu = self.providers == [CPU]
        self._output_names = [t.name for t in outputs]
        self.run_options = run_options(opts, self.providers)
        self.row_parallel = 1
        """Slices of a batch the runtime may run at once (``row_parallel_for``): ``run`` is thread-safe."""

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run the session; returns numpy arrays keyed by output name."""
        values = self.session.run(self._output_names, {t.name: feeds[t.name] for t in self.inputs}, self.run_options)
        return dict(zip(self._output_names, values, strict=True))


def open_component(component: Any, options: Mapping[str, Any]) -> OrtEngine:
    """The onnxruntime backend's engine for one component (``ComponentFiles``) of a compiled folder."""
    threads, providers = options.get("threads"), options.get("providers")
    rows = row_parallel_for(component.size, options.get("parallel") or "auto", threads, providers)
    arena = arena_for(component.name, options.get("arena") or "auto", component.pixels)
    opts = session_options(1 if rows > 1 else threads, arena)
    engine = OrtEngine(component.name, component.graph, component.spec.inputs, component.spec.outputs,
                       providers=providers, options=opts, initializer_overrides=options.get("initializer_overrides"))
    engine.row_parallel = rows
    return engine


def probe(device: int = 0) -> BackendStatus:
    """ONNX Runtime's version and execution providers (``device`` is unused: providers choose their device)."""
    return BackendStatus(True, "providers " + ", ".join(ort.get_available_providers()), ort.__version__)


BACKEND = register_backend(Backend(
    name="onnxruntime",
    title="ONNX Runtime",
    help="runs the exported graphs with ONNX Runtime (CPU; its CUDA / TensorRT providers with onnxruntime-gpu)",
    open=open_component,
    load_options=(
        Option("threads", "ONNX Runtime intra-op threads (default: one per core)", type=int),
        Option("arena", "CPU memory arena: auto (on, except for the VAE of folders built around images over "
               "512x512, whose activations it over-holds), on or off for every component", default="auto",
               choices=ARENAS),
        Option("parallel", "how a component uses the cores: threads (one run at a time on every core), rows (each "
               "core runs a slice of the batch) or auto (rows for networks under 64 MiB, threads for the rest)",
               default="auto", choices=PARALLEL),
        Option("providers", "execution providers, names or (name, options) pairs (default: CPU)", cli=False),
        Option("initializer_overrides", "initializer name -> array written into the graph (LoRA swaps)", cli=False),
    ),
    probe=probe,
    packages=("onnxruntime", "onnxruntime-gpu"),
))
