"""The external-data file names an ONNX graph refers to, read from its protobuf bytes without the onnx package.

Only the fields on the way to a tensor's ``external_data`` are decoded; weights and everything else are skipped.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from sdexport.engines.onnx_weights import fields
from sdexport.errors import ArtifactError

# Field numbers of onnx.proto (ONNX IR): ModelProto.graph = 7, ModelProto.functions = 25; GraphProto.node = 1,
# .initializer = 5, .sparse_initializer = 15; NodeProto.attribute = 5; AttributeProto.t = 5, .g = 6, .tensors = 10,
# .graphs = 11, .sparse_tensor = 22, .sparse_tensors = 23; SparseTensorProto.values = 1, .indices = 2;
# TensorProto.external_data = 13; StringStringEntryProto.key = 1, .value = 2; FunctionProto.node = 7.
_MODEL = {7: "graph", 25: "function"}
_GRAPH = {1: "node", 5: "tensor", 15: "sparse"}
_FUNCTION = {7: "node"}
_NODE = {5: "attribute"}
_ATTRIBUTE = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"}
_SPARSE = {1: "tensor", 2: "tensor"}
_TENSOR = {13: "entry"}


def _entry(buf: memoryview, start: int, end: int) -> tuple[bytes, bytes]:
    key = value = b""
    for number, wire, s, e in fields(buf, start, end):
        if wire != 2:
            continue
        if number == 1:
            key = bytes(buf[s:e])
        elif number == 2:
            value = bytes(buf[s:e])
    return key, value


_KINDS = {"graph": _GRAPH, "function": _FUNCTION, "node": _NODE, "attribute": _ATTRIBUTE, "sparse": _SPARSE,
          "tensor": _TENSOR}


def _walk(buf: memoryview, start: int, end: int, kind: str, found: set[str], depth: int = 0) -> None:
    if depth > 64:
        raise ArtifactError("not an ONNX file: graphs nested too deeply")
    table = _MODEL if kind == "model" else _KINDS[kind]
    for number, wire, s, e in fields(buf, start, end):
        child = table.get(number) if wire == 2 else None
        if child == "entry":
            key, value = _entry(buf, s, e)
            if key == b"location":
                found.add(value.decode("utf-8"))
        elif child is not None:
            _walk(buf, s, e, child, found, depth + 1)


def external_data_locations(graph: Path) -> list[str]:
    """The ``location`` of every external-data reference in ``graph``; ArtifactError naming it if it is not ONNX."""
    found: set[str] = set()
    try:
        with graph.open("rb") as f:
            if graph.stat().st_size == 0:
                raise ArtifactError("not an ONNX file: empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                view = memoryview(data)
                try:
                    _walk(view, 0, len(view), "model", found)
                finally:
                    view.release()
    except (ArtifactError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{graph} is not a readable ONNX graph ({exc}); rebuild the folder") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {graph}: {exc.strerror or exc}") from None
    return sorted(found)
