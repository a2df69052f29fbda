"""One component end to end: wrap, torch references, export, optimise, save, validate, move into place."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from sdexport.engines import artifacts
from sdexport.export import optimize
from sdexport.export.load import Source
from sdexport.export.lora import LORA_TARGETS
from sdexport.export.onnx import dummy_inputs, export_component, torch_outputs, trace_env, validation_envs
from sdexport.export.validate import validate_graph
from sdexport.export.weight_map import weight_map
from sdexport.export.wrappers import wrap
from sdexport.specs import ShapeRanges

log = logging.getLogger(__name__)

GRAPH = "model.onnx"
TYPED = "typed.onnx"


def export_one(source: Source, name: str, precision: str, ranges: ShapeRanges, folder: Path,
               release: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Export component ``name`` of ``source`` into ``folder/name/``; returns its manifest record with files.

    ``release`` is called once the torch module is no longer needed (after the export, before the graph is
    re-read), so the caller can free it when no later component uses it.
    """
    spec = source.spec
    component = spec.components[name]
    wrapper = wrap(source.pipe, spec, component)
    envs = validation_envs(spec, component, ranges)
    cases = []
    for seed, env in enumerate(envs, start=1):
        feeds = dummy_inputs(component, env, seed)
        cases.append((env, feeds, torch_outputs(wrapper, component, feeds)))

    staging = folder / artifacts.BUILD_DIR / "staging" / name
    raw = folder / artifacts.BUILD_DIR / "raw" / name
    for tmp in (staging, raw):
        shutil.rmtree(tmp, ignore_errors=True)
    export_component(wrapper, component, trace_env(spec, component, ranges), raw / GRAPH)
    if precision == "fp16":
        optimize.infer_types(raw / GRAPH, raw / TYPED)
    graph = optimize.drop_initializer_inputs(
        optimize.load_graph(raw / (TYPED if precision == "fp16" else GRAPH), with_data=False))
    module_attr = next(iter(dict(wrapper.named_children())))
    wmap = weight_map(wrapper, module_attr, graph) if name in LORA_TARGETS else None
    del wrapper
    release()
    gc.collect()
    if precision == "fp16":
        onnx.load_external_data_for_model(graph, str(raw))
        graph = optimize.convert_fp16(graph)
    written = optimize.save_graph(graph, staging / GRAPH, source_dir=raw)
    del graph
    shutil.rmtree(raw, ignore_errors=True)
    validation = validate_graph(component, staging / GRAPH, cases, precision)

    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    (target / (GRAPH + ".data")).unlink(missing_ok=True)
    for path in written:
        os.replace(path, target / path.name)
    files = {f"{name}/{p.name}": artifacts.file_record(folder, target / p.name) for p in written}
    record: dict[str, Any] = {
        "graph": f"{name}/{GRAPH}",
        "precision": precision,
        "profile": ranges.profile(component, spec.vae_scale_factor),
        "validation": validation,
    }
    if wmap is not None:
        artifacts.atomic_write_bytes(target / "weight_map.json", json.dumps(wmap, indent=1).encode())
        files[f"{name}/weight_map.json"] = artifacts.file_record(folder, target / "weight_map.json")
        record["weight_map"] = f"{name}/weight_map.json"
    record["files"] = files
    shutil.rmtree(staging, ignore_errors=True)
    return record
