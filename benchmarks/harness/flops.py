"""Counting a UNet's floating-point operations from what ONNX Runtime actually executes (its profiler records
every kernel's input and output shapes), with no torch; plus where the kernel time goes, by operator type."""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CONV_OPS = frozenset({"Conv", "FusedConv", "NhwcFusedConv"})
MATMUL_OPS = frozenset({"MatMul", "FusedMatMul", "Gemm", "FusedGemm"})


def node_flops(op: str, inputs: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> int:
    """FLOPs (2 per multiply-add) of one Conv / MatMul / Gemm kernel from its shapes; 0 for other operators.

    Conv: ``2 * |output| * Cin/groups * kh * kw`` (the weight is input 1, [Cout, Cin/groups, kh, kw]).
    MatMul / Gemm: ``2 * |output| * K`` with K the last dim of input A (the exporter never transposes A; a
    pre-packed weight B is left out of ONNX Runtime's profile, so B's shape cannot be used).
    """
    if not outputs or not inputs:
        return 0
    out = math.prod(outputs[0])
    if op in CONV_OPS:
        if len(inputs) < 2 or len(inputs[1]) < 3:
            return 0
        return 2 * out * math.prod(inputs[1][1:])
    if op in MATMUL_OPS:
        a = inputs[0]
        return 2 * out * (a[-1] if a else 1)
    return 0


def _shapes(entries: Iterable[Mapping[str, Sequence[int]]] | None) -> list[list[int]]:
    return [list(next(iter(e.values()))) for e in entries or [] if e]


@dataclass
class ProfileSummary:
    """FLOPs and kernel time per operator type of one profiled run."""

    flops: int = 0
    flops_by_op: Counter = field(default_factory=Counter)
    seconds_by_op: Counter = field(default_factory=Counter)

    @property
    def kernel_seconds(self) -> float:
        """Total time inside kernels."""
        return float(sum(self.seconds_by_op.values()))

    def time_shares(self, top: int = 8) -> dict[str, float]:
        """Fraction of kernel time per operator type, largest first (the rest as "other")."""
        total = self.kernel_seconds or 1.0
        ranked = self.seconds_by_op.most_common()
        shares = {op: s / total for op, s in ranked[:top]}
        rest = sum(s for _, s in ranked[top:])
        if rest:
            shares["other"] = rest / total
        return shares

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"flops": self.flops, "flops_by_op": dict(self.flops_by_op), "kernel_s": self.kernel_seconds,
                "time_shares": self.time_shares()}


def last_run(events: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The events of the last ``run`` in a profile (the profiler covers every run of the session)."""
    starts = [e.get("ts", 0) for e in events if e.get("name") == "model_run"]
    begin = max(starts) if starts else 0
    return [e for e in events if e.get("ts", 0) >= begin]


def summarize_profile(events: Iterable[Mapping[str, Any]]) -> ProfileSummary:
    """Add up an ONNX Runtime profile (the JSON list from ``end_profiling``): FLOPs and kernel time per op."""
    out = ProfileSummary()
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        op = args.get("op_name", "?")
        flops = node_flops(op, _shapes(args.get("input_type_shape")), _shapes(args.get("output_type_shape")))
        out.flops += flops
        if flops:
            out.flops_by_op[op] += flops
        out.seconds_by_op[op] += float(event.get("dur", 0)) * 1e-6
    return out


def profile_graph(graph: Path, feeds: Mapping[str, np.ndarray], level: str = "basic", runs: int = 1,
                  threads: int | None = None) -> ProfileSummary:
    """Run ``graph`` ``runs`` times under ONNX Runtime's profiler at optimisation ``level``; summarize the last.

    Count FLOPs at "basic": the "all" level's NCHWc layout pads some convolutions' channels (more FLOPs executed
    than the architecture has); profile at "all" to see where the served graph's time goes.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level.upper()}")
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(graph).parent.name) + "-flops"
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(graph), sess_options=opts, providers=["CPUExecutionProvider"])
    for _ in range(max(1, runs)):
        session.run(None, dict(feeds))
    path = Path(session.end_profiling())
    try:
        return summarize_profile(last_run(json.loads(path.read_text())))
    finally:
        path.unlink(missing_ok=True)


def component_feeds(folder: Path, component: str, rows: int, height: int, width: int) -> dict[str, np.ndarray]:
    """Inputs for one component of a compiled folder with ``rows`` on the batch axis, from the manifest's tensor
    specs (the shapes the runtime feeds it): zeros, and mid-schedule timesteps."""
    from sdexport.specs import ModelSpec

    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    spec = ModelSpec.from_dict(manifest["model"])
    env = {"batch": rows, "latent_height": height // spec.vae_scale_factor,
           "latent_width": width // spec.vae_scale_factor, "height": height, "width": width, "sequence": 77}
    feeds = {}
    for tensor in spec.components[component].inputs:
        shape = tensor.shape(env)
        feeds[tensor.name] = (np.full(shape, 500.0, dtype=tensor.dtype) if tensor.name == "timestep"
                              else np.zeros(shape, dtype=tensor.dtype))
    return feeds


def unet_feeds(folder: Path, batch: int, height: int, width: int, cfg: bool = True) -> dict[str, np.ndarray]:
    """The UNet's inputs for one generation setting: 2 x batch rows with classifier-free guidance."""
    return component_feeds(folder, "unet", batch * (2 if cfg else 1), height, width)


def component_graph(folder: Path, component: str = "unet") -> Path:
    """A component's ONNX graph in a compiled folder."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    return Path(folder) / manifest["components"][component]["graph"]


def count_unet(folder: Path, batch: int, height: int, width: int) -> dict[str, Any]:
    """FLOPs of one UNet evaluation (with CFG: 2 x batch rows, counted on the portable graph) and the kernel-time
    shares by op of the graph the runtime serves (the fused one when the folder has it)."""
    from sdexport.engines.artifacts import fused_graph

    graph, feeds = component_graph(folder), unet_feeds(folder, batch, height, width)
    counted = profile_graph(graph, feeds, level="basic")
    served = profile_graph(fused_graph(graph), feeds, level="all", runs=2)  # the graph the runtime opens
    return {"flops": counted.flops, "flops_by_op": dict(counted.flops_by_op), "time_shares": served.time_shares(),
            "rows": next(iter(feeds.values())).shape[0]}
