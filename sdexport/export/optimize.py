"""Graph passes on exported ONNX models, one per function: input cleanup, fp16 conversion, saving."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx

log = logging.getLogger(__name__)

EXTERNAL_MIN_BYTES = 1024
"""Weights at least this large are saved in the graph's data file, smaller ones (shapes, scalars) inline."""
# Ops kept in fp32 inside fp16 graphs: normalisation statistics and the softmax/exp family overflow in fp16.
FP16_KEEP_FP32_OPS = ["InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax", "Exp"]


def drop_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove graph inputs that only exist because parameters were exported as inputs."""
    names = {init.name for init in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model


def infer_types(path: Path, typed_path: Path) -> None:
    """Shape/type inference from file to file, which works for graphs over 2 GB (in-memory inference does not)."""
    onnx.shape_inference.infer_shapes_path(str(path), str(typed_path))


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations with fp32 inputs/outputs; normalisation and softmax kept in fp32.

    ``model`` must already carry value types (see ``infer_types``): the converter's own inference serialises the
    whole model and fails past 2 GB.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=FP16_KEEP_FP32_OPS, disable_shape_infer=True
    )
    wrapped = OnnxModel(converted)
    wrapped.remove_cascaded_cast_nodes()
    wrapped.remove_useless_cast_nodes()
    return wrapped.model


def _read_external(tensor: onnx.TensorProto, source_dir: Path) -> bytes:
    info = {e.key: e.value for e in tensor.external_data}
    with (source_dir / info["location"]).open("rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"])) if "length" in info else f.read()


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def convert_fp16_streaming(model: onnx.ModelProto, source_dir: Path) -> onnx.ModelProto:
    """``convert_fp16`` for a model loaded without its external weights, one tensor in memory at a time.

    Weights consumed only by fp16 nodes are cast to fp16 here, streamed into ``source_dir/fp16.data``; weights that
    feed an fp32-kept op are loaded inline and left to the converter (they are small: normalisation parameters).
    The converter then decides the same as it would on the loaded model, without holding 10 GB twice.
    """
    from onnxruntime.transformers.float16 import convert_np_to_float16

    keep_fp32 = {i for node in model.graph.node if node.op_type in FP16_KEEP_FP32_OPS for i in node.input}
    data_path = source_dir / "fp16.data"
    with data_path.open("wb") as out:
        for tensor in _external_tensors(model):
            data = _read_external(tensor, source_dir)
            if tensor.data_type == onnx.TensorProto.FLOAT and tensor.name not in keep_fp32:
                half = convert_np_to_float16(np.frombuffer(data, dtype=np.float32)).tobytes()
                offset = out.tell()
                out.write(half)
                tensor.data_type = onnx.TensorProto.FLOAT16
                _set_external(tensor, data_path.name, offset, len(half))
            else:
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = data
    return convert_fp16(model)


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def _write_aligned(out: BinaryIO, data: bytes) -> int:
    """Append ``data`` to ``out`` at the next page boundary (page-aligned tensors can be memory-mapped); its offset."""
    out.write(b"\0" * (-out.tell() % 4096))
    offset = out.tell()
    out.write(data)
    return offset


def _stream_external_data(model: onnx.ModelProto, source_dir: Path, data_path: Path) -> None:
    """Copy every external tensor from its (loose) file under ``source_dir`` into ONE data file, one at a time.

    Peak memory is one tensor, not the whole model: this is how a 10 GB UNet is consolidated on a 24 GB machine.
    """
    with data_path.open("wb") as out:
        for tensor in _external_tensors(model):
            data = _read_external(tensor, source_dir)
            _set_external(tensor, data_path.name, _write_aligned(out, data), len(data))


def _move_inline_data(model: onnx.ModelProto, data_path: Path) -> None:
    """Move every inline weight of at least ``EXTERNAL_MIN_BYTES`` into ONE data file; small ones stay inline."""
    with data_path.open("wb") as out:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                data = tensor.raw_data
                _set_external(tensor, data_path.name, _write_aligned(out, data), len(data))
                tensor.ClearField("raw_data")


def save_graph(model: onnx.ModelProto, path: Path, source_dir: Path | None = None) -> list[Path]:
    """Save one graph with its weights in ONE external-data file next to it (``<graph>.data``), whatever its size.

    Weights inside the protobuf cost ONNX Runtime two to three times their size to load and it keeps most of that
    (SD 1.5 text encoder: 846 MiB resident for 470 MiB of weights; 421 MiB from a data file). A model loaded
    without its external data (``source_dir`` says where the loose files are) is consolidated by streaming.
    Returns every file written (the graph, and its data file when it has weights).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.parent / (path.name + ".data")
    data_path.unlink(missing_ok=True)
    if _external_tensors(model):
        if source_dir is None:
            raise ValueError("a graph with external tensors needs source_dir to find them")
        _stream_external_data(model, source_dir, data_path)
    else:
        _move_inline_data(model, data_path)
    if not _external_tensors(model):
        data_path.unlink()  # no weight of EXTERNAL_MIN_BYTES or more: the graph stands alone
    onnx.save_model(model, str(path))
    return [path, data_path] if data_path.exists() else [path]


def load_graph(path: Path, with_data: bool = True) -> onnx.ModelProto:
    """Load a graph, with its external data (loose files included) unless ``with_data`` is False."""
    return onnx.load(str(path), load_external_data=with_data)
