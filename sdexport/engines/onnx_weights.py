"""Read and rewrite named initializers of an ONNX file without the onnx package and without loading the rest.

The serving runtime has no ``onnx`` dependency, and an SDXL UNet graph is gigabytes: this walks the protobuf wire
format of ModelProto -> GraphProto -> TensorProto (memory-mapped for reading), skipping what it is not asked for.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdexport.errors import ArtifactError

# onnx.TensorProto.DataType -> numpy dtype (the types weights come in).
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8), 5: np.dtype(np.int16),
    6: np.dtype(np.int32), 7: np.dtype(np.int64), 9: np.dtype(np.bool_), 10: np.dtype(np.float16),
    11: np.dtype(np.float64),
}
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_T_DIMS, _T_TYPE, _T_FLOAT, _T_INT32, _T_INT64, _T_NAME = 1, 2, 4, 5, 7, 8
_T_RAW, _T_DOUBLE, _T_EXTERNAL, _T_LOCATION = 9, 10, 13, 14


def _varint(buf: memoryview | bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ArtifactError(f"not an ONNX file: truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value, end) per field of the message in buf[start:end].

    For length-delimited fields (wire type 2) ``value`` is the payload's start offset in ``buf`` and ``end`` its
    end, so nested messages are parsed in place; for the others ``end`` is the next field's offset.
    """
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ArtifactError(f"not an ONNX file: field {number} at byte {pos} runs past its message")
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, wire, int.from_bytes(buf[pos:pos + size], "little"), pos + size
            pos += size
        else:
            raise ArtifactError(f"not an ONNX file: protobuf wire type {wire} at byte {pos}")


def _varints(buf: memoryview, wire: int, value: int, end: int) -> list[int]:
    if wire != 2:
        return [value]
    out, pos = [], value
    while pos < end:
        item, pos = _varint(buf, pos)
        out.append(item)
    return out


@dataclass
class _Tensor:
    """Where one initializer's data is: inline raw bytes, repeated fields, or an external file."""

    name: str = ""
    dtype: int = 0
    dims: tuple[int, ...] = ()
    raw: tuple[int, int] | None = None
    external: dict[str, str] | None = None
    repeated: list[tuple[int, int, int, int]] | None = None


def _tensor(buf: memoryview, start: int, end: int) -> _Tensor:
    t = _Tensor()
    dims: list[int] = []
    for number, wire, value, stop in fields(buf, start, end):
        if number == _T_DIMS:
            dims += _varints(buf, wire, value, stop)
        elif number == _T_TYPE:
            t.dtype = value
        elif number == _T_NAME:
            t.name = bytes(buf[value:stop]).decode()
        elif number == _T_RAW:
            t.raw = (value, stop)
        elif number == _T_EXTERNAL:
            entry = {k: bytes(buf[v:e]).decode() for k, _, v, e in fields(buf, value, stop)}
            t.external = t.external or {}
            t.external[entry.get(1, "")] = entry.get(2, "")
        elif number == _T_LOCATION and value == 1:
            t.external = t.external or {}
        elif number in (_T_FLOAT, _T_INT32, _T_INT64, _T_DOUBLE):
            t.repeated = (t.repeated or []) + [(number, wire, value, stop)]
    t.dims = tuple(dims)
    return t


def _initializers(buf: memoryview, names: set[str]) -> Iterator[tuple[_Tensor, int, int]]:
    """(tensor, start, end) of every initializer whose name is in ``names``."""
    for number, _, gstart, gend in fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH:
            continue
        for field, _, start, end in fields(buf, gstart, gend):
            if field != _GRAPH_INITIALIZER:
                continue
            name = next((bytes(buf[v:e]).decode() for n, _, v, e in fields(buf, start, end) if n == _T_NAME), "")
            if name in names:
                yield _tensor(buf, start, end), start, end


def _array(buf: memoryview, t: _Tensor, graph_dir: Path) -> np.ndarray:
    """The tensor's values as a new array (never a view of ``buf``)."""
    if t.dtype not in DTYPES:
        raise ArtifactError(f"initializer {t.name!r} has ONNX data type {t.dtype}, which sdexport does not read")
    dtype = DTYPES[t.dtype]
    little = dtype.newbyteorder("<")
    if t.external is not None:
        return _read_external(t, graph_dir, dtype)
    if t.raw is not None:
        return np.frombuffer(buf[t.raw[0]:t.raw[1]], dtype=little).astype(dtype, copy=True).reshape(t.dims)
    if not t.repeated:
        return np.zeros(t.dims, dtype=dtype)
    number = t.repeated[0][0]
    if number in (_T_FLOAT, _T_DOUBLE):
        size, code = (4, "<f4") if number == _T_FLOAT else (8, "<f8")
        data = b"".join(bytes(buf[v:e]) if w == 2 else v.to_bytes(size, "little") for _, w, v, e in t.repeated)
        return np.frombuffer(data, dtype=code).astype(dtype).reshape(t.dims)
    values = [x for _, w, v, e in t.repeated for x in _varints(buf, w, v, e)]
    if dtype == np.float16:  # fp16 bit patterns are stored in int32_data
        return np.array(values, dtype=np.uint16).view(np.float16).reshape(t.dims)
    return np.array(values, dtype=np.uint64).view(np.int64).astype(dtype).reshape(t.dims)


def _read_external(t: _Tensor, graph_dir: Path, dtype: np.dtype) -> np.ndarray:
    location = (t.external or {}).get("location", "")
    path = (graph_dir / location).resolve()
    if not location or Path(location).is_absolute() or graph_dir.resolve() not in path.parents:
        raise ArtifactError(f"initializer {t.name!r} points at external data {location!r} outside {graph_dir}")
    count = int(np.prod(t.dims, dtype=np.int64))
    offset = int((t.external or {}).get("offset", 0))
    array = np.fromfile(path, dtype=dtype.newbyteorder("<"), count=count, offset=offset)
    if array.size != count:
        raise ArtifactError(f"{path} ends before initializer {t.name!r} (wanted {count} values at byte {offset})")
    return array.astype(dtype).reshape(t.dims)


def _missing(graph: Path, wanted: Iterable[str], found: Iterable[str]) -> None:
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ArtifactError(f"{graph} has no initializer {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                            "its weight map does not match it: rebuild the folder")


def read_initializers(graph: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The named initializers of an ONNX file as numpy arrays (copies); raise naming any that is missing."""
    graph, wanted = Path(graph), set(names)
    with graph.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        buf = memoryview(mapped)
        try:
            out = {t.name: _array(buf, t, graph.parent) for t, _, _ in _initializers(buf, wanted)}
        finally:
            buf.release()
    _missing(graph, wanted, out)
    return out


def patched_model(graph: Path, overrides: Mapping[str, np.ndarray]) -> tuple[bytes | None, dict[str, np.ndarray]]:
    """Split initializer overrides for ONNX Runtime: (the model's bytes with every inline override written in
    place, or None when no override is inline; the overrides of initializers kept in external data files).

    Pass the bytes to ``InferenceSession`` and the rest to ``SessionOptions.add_external_initializers``.
    ``SessionOptions.add_initializer`` is not enough: ONNX Runtime's graph optimisations (constant folding,
    layout transforms) read the model file's initializers, so a plain override is silently ignored wherever a
    weight feeds a folded or transformed node.
    """
    graph = Path(graph)
    data = bytearray(graph.read_bytes())
    buf = memoryview(data)
    external: dict[str, np.ndarray] = {}
    inline = 0
    found = []
    try:
        for t, _, _ in list(_initializers(buf, set(overrides))):
            found.append(t.name)
            new = np.ascontiguousarray(overrides[t.name])
            old = DTYPES.get(t.dtype)
            if new.dtype != old or new.shape != t.dims:
                raise ValueError(f"override of {t.name!r} is {new.dtype}{list(new.shape)}, the graph has "
                                 f"{old}{list(t.dims)}")
            if t.external is not None:
                external[t.name] = new
            elif t.raw is not None:
                data[t.raw[0]:t.raw[1]] = new.astype(new.dtype.newbyteorder("<")).tobytes()
                inline += 1
            else:
                raise ValueError(f"{graph}: initializer {t.name!r} is not stored as raw bytes, so it cannot be "
                                 "overridden; re-export the graph")
    finally:
        buf.release()
    _missing(graph, overrides, found)
    return (bytes(data) if inline else None), external
