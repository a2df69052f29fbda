"""ONNX Runtime-only graph pass: the constant-scale attention pattern -> ``com.microsoft.MultiHeadAttention``.

The pattern is the one ``export.attention`` traces: per head split ``Reshape(x, [B, -1, H, d])`` and
``Transpose``s, ``MatMul(Q, K^T)``, ``Mul`` by a constant, ``Softmax(-1)``, ``MatMul(., V)``, then the head merge
``Transpose`` + ``Reshape`` back to ``[B, S, H*d]``. Each match becomes one MultiHeadAttention node fed by the
projections' outputs (Q, K and V stay separate MatMuls, so every weight keeps its initializer and its name: the
weight map and LoRA swaps apply to this graph as to the portable one). ONNX Runtime's CPU kernel for it does not
materialise the score matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
HEAD_SPLIT = [0, 2, 1, 3]
KEY_SPLIT = [0, 2, 3, 1]


@dataclass(frozen=True)
class Match:
    """One attention block: its three (batch, sequence, hidden) inputs, heads, scale and merged output name."""

    query: str
    key: str
    value: str
    heads: int
    scale: float
    output: str


class _Graph:
    """Producer / consumer / constant look-ups over a graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}

    def op(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is an initializer, a Constant, or an Unsqueeze of one."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        if node.op_type == "Unsqueeze":
            inner = self.constant(node.input[0])
            return None if inner is None else inner.reshape(-1)
        return None


def _perm(node: onnx.NodeProto) -> list[int]:
    return list(next(helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"))


def _split_source(g: _Graph, name: str, perm: list[int]) -> tuple[str, int] | None:
    """Walk back through Transposes to a head-split Reshape; (its input, heads) if the transposes compose to perm."""
    composed = list(range(4))
    while (node := g.op(name, "Transpose")) is not None:
        if len(_perm(node)) != 4:
            return None  # not a head split (e.g. a custom processor's [batch * heads, sequence, d] layout)
        composed = [_perm(node)[i] for i in composed]
        name = node.input[0]
    reshape = g.op(name, "Reshape")
    if reshape is None or composed != perm:
        return None
    concat = g.op(reshape.input[1], "Concat")
    shape = g.constant(reshape.input[1])
    if concat is not None and len(concat.input) == 4:
        shape = g.constant(concat.input[2])  # the heads entry of [B, -1, H, d]; B (and d) may be computed
        shape = None if shape is None or shape.size != 1 else np.array([0, -1, shape.reshape(-1)[0], 0])
    if shape is None or shape.size != 4 or shape[2] <= 0:
        return None
    return reshape.input[0], int(shape[2])


def _scale_of(g: _Graph, mul: onnx.NodeProto) -> tuple[str, float] | None:
    """(the other input, the scalar) of a Mul by a constant scalar."""
    for i in (0, 1):
        value = g.constant(mul.input[i])
        if value is not None and value.size == 1:
            return mul.input[1 - i], float(value.reshape(-1)[0])
    return None


def _merged_output(g: _Graph, attended: str) -> str | None:
    """The output of the head-merge Transpose + Reshape that follows the attention's last MatMul."""
    transpose = g.only_consumer(attended, "Transpose")
    if transpose is None or _perm(transpose) != HEAD_SPLIT:
        return None
    reshape = g.only_consumer(transpose.output[0], "Reshape")
    return None if reshape is None else reshape.output[0]


def find_attention(graph: onnx.GraphProto) -> list[Match]:
    """Every constant-scale attention block of ``graph`` (see the module docstring for the pattern)."""
    g = _Graph(graph)
    matches = []
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        axis = next((helper.get_attribute_value(a) for a in softmax.attribute if a.name == "axis"), -1)
        mul = g.op(softmax.input[0], "Mul")
        scaled = _scale_of(g, mul) if mul is not None and axis in (-1, 3) else None
        scores = g.op(scaled[0], "MatMul") if scaled is not None else None
        attend = g.only_consumer(softmax.output[0], "MatMul")
        if scores is None or attend is None or attend.input[0] != softmax.output[0]:
            continue
        query = _split_source(g, scores.input[0], HEAD_SPLIT)
        key = _split_source(g, scores.input[1], KEY_SPLIT)
        value = _split_source(g, attend.input[1], HEAD_SPLIT)
        output = _merged_output(g, attend.output[0])
        if query and key and value and output and query[1] == key[1] == value[1]:
            matches.append(Match(query[0], key[0], value[0], query[1], scaled[1], output))
    return matches


def _prune(graph: onnx.GraphProto) -> int:
    """Remove nodes no graph output depends on; returns how many."""
    nodes = list(graph.node)
    producer = {out: index for index, node in enumerate(nodes) for out in node.output}
    live: set[int] = set()
    stack = [o.name for o in graph.output]
    while stack:
        index = producer.get(stack.pop())
        if index is not None and index not in live:
            live.add(index)
            stack.extend(i for i in nodes[index].input if i)
    keep = [n for index, n in enumerate(nodes) if index in live]
    removed = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(keep)
    return removed


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every value whose shape ONNX shape inference can tell (the graph's weights need not be loaded)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # noqa: BLE001 - without ranks, every match is kept as before
        log.debug("shape inference failed (%s); attention inputs not rank-checked", exc)
        return {}
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}


def fuse_attention(model: onnx.ModelProto) -> int:
    """Replace every match of ``find_attention`` in ``model`` (in place) by MultiHeadAttention; returns the count.

    MultiHeadAttention takes (batch, sequence, hidden) inputs: a match whose query, key or value has another rank
    (an IP-Adapter's image tokens arrive as [batch, images, tokens, hidden]) stays unfused.
    """
    ranks = _ranks(model)
    matches = [m for m in find_attention(model.graph)
               if all(ranks.get(name, 3) == 3 for name in (m.query, m.key, m.value))]
    if not matches:
        return 0
    g = _Graph(model.graph)
    replace = {}
    for i, m in enumerate(matches):
        merge = g.producer[m.output]
        replace[m.output] = helper.make_node(
            "MultiHeadAttention", [m.query, m.key, m.value], [m.output], domain=MS_DOMAIN,
            name=f"{merge.name or m.output}/MultiHeadAttention_{i}", num_heads=m.heads, scale=m.scale)
    # Each fused node takes its head merge's place, after the producers of Q, K and V: the order stays valid.
    nodes = [replace.get(n.output[0], n) if n.output else n for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    removed = _prune(model.graph)
    if all(o.domain != MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    log.info("fused %d attention blocks into MultiHeadAttention (%d nodes removed)", len(matches), removed)
    return len(matches)



def write_fused_graph(graph: Path, fused: Path) -> int:
    """Write ``fused``: ``graph`` with its attention fused; returns the count (0: nothing written).

    External weights stay where they are: the fused graph refers to the portable graph's data file (same folder).
    """
    model = onnx.load(str(graph), load_external_data=False)
    count = fuse_attention(model)
    if count:
        onnx.save_model(model, str(fused))
    return count
