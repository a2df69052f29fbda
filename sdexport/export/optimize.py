"""Graph passes on exported ONNX models, one per function: input cleanup, fp16 conversion, saving."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
# Ops kept in fp32 inside fp16 graphs: normalisation statistics and the softmax/exp family overflow in fp16.
FP16_KEEP_FP32_OPS = ["InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax", "Exp"]


def drop_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove graph inputs that only exist because parameters were exported as inputs."""
    names = {init.name for init in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Total size of the weights (counted from the tensors, not from ByteSize(), which can overflow)."""
    total = 0
    for init in model.graph.initializer:
        count = 1
        for dim in init.dims:
            count *= dim
        total += count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations with fp32 inputs/outputs; normalisation and softmax kept in fp32."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    wrapped.convert_float_to_float16(
        use_symbolic_shape_infer=False, keep_io_types=True, op_block_list=FP16_KEEP_FP32_OPS
    )
    return wrapped.model


def save_graph(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save one graph; weights go to ONE external-data file next to it when the graph would pass 2 GB.

    Returns every file written (the graph, and its data file if any).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    (path.parent / data_name).unlink(missing_ok=True)
    if initializer_bytes(model) < PROTOBUF_LIMIT - (64 << 20):
        onnx.save_model(model, str(path))
        return [path]
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data_name, size_threshold=1024,
    )
    return [path, path.parent / data_name]


def load_graph(path: Path) -> onnx.ModelProto:
    """Load a graph with its external data (loose files included)."""
    return onnx.load(str(path), load_external_data=True)
