"""One component in two phases: trace with torch (phase 1), then optimise, save, validate, move (phase 2)."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdexport.engines import artifacts
from sdexport.engines.artifacts import FUSED_GRAPH
from sdexport.export import optimize
from sdexport.export.attention import CONSTANT_SCALE_COMPONENTS, constant_scale_attention
from sdexport.export.fused_attention import write_fused_graph
from sdexport.export.load import Source
from sdexport.export.lora import LORA_TARGETS
from sdexport.export.onnx import dummy_inputs, export_component, torch_outputs, trace_env, validation_envs
from sdexport.export.processors import processor_record, trace_guard
from sdexport.export.validate import validate_graph
from sdexport.export.weight_map import weight_map
from sdexport.export.wrappers import wrap
from sdexport.specs import ModelSpec, ShapeRanges

log = logging.getLogger(__name__)

GRAPH = "model.onnx"
TYPED = "typed.onnx"


@dataclass
class RawExport:
    """Phase 1 of a component (torch needed): the raw graph on disk, torch reference outputs, the weight map."""

    name: str
    precision: str
    raw: Path
    cases: list[tuple[dict[str, int], dict[str, np.ndarray], list[np.ndarray]]]
    weight_map: dict[str, Any] | None
    record: dict[str, Any] = field(default_factory=dict)
    """Entries added to the component's manifest record (the attention processor of each layer, ...)."""


def export_raw(source: Source, name: str, precision: str, ranges: ShapeRanges, folder: Path) -> RawExport:
    """Trace component ``name`` to ``.build/raw/<name>/`` and keep torch's outputs at the validation shapes."""
    spec = source.spec
    component = spec.components[name]
    wrapper = wrap(source.pipe, spec, component)
    cases = []
    for seed, env in enumerate(validation_envs(spec, component, ranges), start=1):
        feeds = dummy_inputs(component, env, seed)
        cases.append((env, feeds, torch_outputs(wrapper, component, feeds)))
    raw = folder / artifacts.BUILD_DIR / "raw" / name
    shutil.rmtree(raw, ignore_errors=True)
    with constant_scale_attention() if name in CONSTANT_SCALE_COMPONENTS else contextlib.nullcontext(), \
            trace_guard(wrapper, name) as traced:
        export_component(wrapper, component, trace_env(spec, component, ranges), raw / GRAPH)
    wmap = None
    if name in LORA_TARGETS:
        graph = optimize.load_graph(raw / GRAPH, with_data=False)
        wmap = weight_map(wrapper, next(iter(dict(wrapper.named_children()))), graph)
    processors = processor_record(wrapper, traced)
    extra = {"attention_processors": processors} if processors else {}
    return RawExport(name, precision, raw, cases, wmap, {**extra, **getattr(wrapper, "record", {})})


def finish(raw_export: RawExport, spec: ModelSpec, ranges: ShapeRanges, folder: Path) -> dict[str, Any]:
    """Phase 2 (no torch in memory): optimise, save, validate, move into ``folder/<name>/``; returns the record."""
    name, precision, raw = raw_export.name, raw_export.precision, raw_export.raw
    component = spec.components[name]
    staging = folder / artifacts.BUILD_DIR / "staging" / name
    shutil.rmtree(staging, ignore_errors=True)
    if precision == "fp16":
        optimize.infer_types(raw / GRAPH, raw / TYPED)
    graph = optimize.drop_initializer_inputs(
        optimize.load_graph(raw / (TYPED if precision == "fp16" else GRAPH), with_data=False))
    if precision == "fp16":
        graph = optimize.convert_fp16_streaming(graph, raw)
        gc.collect()
    written = optimize.save_graph(graph, staging / GRAPH, source_dir=raw)
    del graph
    gc.collect()
    shutil.rmtree(raw, ignore_errors=True)
    validation = validate_graph(component, staging / GRAPH, raw_export.cases, precision)
    if precision == "fp32" and write_fused_graph(staging / GRAPH, staging / FUSED_GRAPH):
        validation["fused"] = validate_graph(component, staging / FUSED_GRAPH, raw_export.cases, precision)
        written.append(staging / FUSED_GRAPH)

    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    for stale in (GRAPH + ".data", FUSED_GRAPH):
        (target / stale).unlink(missing_ok=True)
    for path in written:
        os.replace(path, target / path.name)
    files = {f"{name}/{p.name}": artifacts.file_record(folder, target / p.name) for p in written}
    record: dict[str, Any] = {
        "graph": f"{name}/{GRAPH}",
        "precision": precision,
        "profile": ranges.profile(component, spec.vae_scale_factor),
        "validation": validation,
        **raw_export.record,
    }
    if raw_export.weight_map is not None:
        artifacts.atomic_write_bytes(target / "weight_map.json", json.dumps(raw_export.weight_map, indent=1).encode())
        files[f"{name}/weight_map.json"] = artifacts.file_record(folder, target / "weight_map.json")
        record["weight_map"] = f"{name}/weight_map.json"
    record["files"] = files
    shutil.rmtree(staging, ignore_errors=True)
    return record
