"""Pass: read a quantized (QDQ) graph as its dequantized float equivalent.

:func:`strip_qdq` (run by the :class:`StripQDQ` pass) edits a graph in place:

* ``DequantizeLinear(x, scale[, zero_point])`` whose inputs are all initializers becomes the float
  initializer ``(x - zero_point) * scale`` named like the node's output, computed by
  :func:`laqonnx.quant.numerics.dequantize` (int8/uint8/int4/uint4/int16/uint16, per-tensor or per-axis;
  opsets 13/19/21 and the com.microsoft contrib op). int32 tensors (biases) are dequantized
  exactly in float32 as ONNX does; blocked ones (opset 21 ``block_size``, as MatMulNBits-form int4
  weights are written) exactly as ONNX defines them; other forms (float8, non-float32 scale) stay as nodes,
  and the reason is returned so a layer using them can say why it is skipped.
* ``QuantizeLinear -> DequantizeLinear`` on an activation is removed (the DequantizeLinear's users
  read the QuantizeLinear's input): activation rounding is treated as identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..quant.numerics import QParams, dequantize
from .passes import ProtoPass

__all__ = ["QDQ_DOMAINS", "QUANTIZED_OPS", "StrippedQDQ", "StripQDQ", "count_quantized_nodes", "strip_qdq"]

QDQ_DOMAINS: tuple[str, ...] = ("", "ai.onnx", "com.microsoft")
QUANTIZED_OPS: tuple[str, ...] = (
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "QGemm",
)
# ONNX element type -> (bits, signed) of a quantized weight QParams can describe
_ELEMENT: dict[int, tuple[int, bool]] = {
    TensorProto.INT8: (8, True), TensorProto.UINT8: (8, False), TensorProto.INT4: (4, True),
    TensorProto.UINT4: (4, False), TensorProto.INT16: (16, True), TensorProto.UINT16: (16, False),
}


@dataclass
class StrippedQDQ:
    """What :func:`strip_qdq` did: dequantized constants (with their qparams), removed pairs, leftovers."""

    qparams: dict[str, QParams] = field(default_factory=dict)  # dequantized tensor -> its qparams
    unsupported: dict[str, str] = field(default_factory=dict)  # DequantizeLinear output left in place -> why
    activation_pairs: int = 0


def count_quantized_nodes(graph: onnx.GraphProto) -> int:
    """How many quantization nodes (QDQ or QOperator, any of :data:`QUANTIZED_OPS`) ``graph`` has."""
    return sum(1 for n in graph.node if n.op_type in QUANTIZED_OPS and n.domain in QDQ_DOMAINS)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(onnx.helper.get_attribute_value(a))
    return default


def _dequantize_constant(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, QParams | None] | str:
    """The dequantized value of a DequantizeLinear of initializers (and its qparams), or why not."""
    x_t, s_t = inits[node.input[0]], inits[node.input[1]]
    if s_t.data_type != TensorProto.FLOAT:
        return f"scale of type {TensorProto.DataType.Name(s_t.data_type)} (only float32 is supported)"
    x = numpy_helper.to_array(x_t).astype(np.int64)
    scale = numpy_helper.to_array(s_t).astype(np.float32)
    has_zp = len(node.input) > 2 and node.input[2]
    zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.int64) if has_zp else np.zeros(scale.shape, np.int64)
    block = _attr(node, "block_size", 0)
    if block:
        return _dequantize_blocked(x, scale, zp, block, _attr(node, "axis", 1), x_t.data_type)
    per_tensor = scale.ndim == 0 or (scale.ndim == 1 and scale.size == 1)  # as onnxruntime
    axis = None if per_tensor else _attr(node, "axis", 1)
    if per_tensor:
        scale, zp = scale.reshape(()), zp.reshape(())
    if x_t.data_type == TensorProto.INT32:  # a bias: ONNX computes float(x - zp) * scale in float32
        if axis is not None:
            if not -x.ndim <= axis < x.ndim or x.shape[axis] != scale.size:
                return f"{scale.size} scales for axis {axis} of a tensor of shape {x.shape}"
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        return ((x - zp).astype(np.float32) * scale).astype(np.float32), None
    kind = _ELEMENT.get(x_t.data_type)
    if kind is None:
        return f"element type {TensorProto.DataType.Name(x_t.data_type)} is not supported"
    try:
        qp = QParams(scale=scale, zero_point=zp, bits=kind[0], signed=kind[1], axis=axis)
        return dequantize(x, qp), qp
    except ValueError as exc:
        return str(exc)


def _dequantize_blocked(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, block: int, axis: int,
                       dtype: int) -> tuple[np.ndarray, None] | str:
    """ONNX's blocked DequantizeLinear: ``scale`` and ``zp`` have ``x``'s shape but ``ceil(n / block)``
    along ``axis``; element ``i`` on that axis uses block ``i // block``. No QParams describes it."""
    if dtype not in _ELEMENT:
        return f"element type {TensorProto.DataType.Name(dtype)} is not supported"
    if block < 1 or not -x.ndim <= axis < x.ndim:
        return f"block_size {block} on axis {axis} of a tensor of shape {x.shape}"
    axis %= x.ndim
    n = x.shape[axis]
    want = tuple(-(-n // block) if d == axis else x.shape[d] for d in range(x.ndim))
    if scale.shape != want or zp.shape != want:
        return f"blocked scale of shape {scale.shape} (zero point {zp.shape}) for a tensor of shape {x.shape}, block {block}"
    s = np.take(np.repeat(scale, block, axis=axis), np.arange(n), axis=axis)
    z = np.take(np.repeat(zp, block, axis=axis), np.arange(n), axis=axis)
    return ((x - z).astype(np.float32) * s).astype(np.float32), None


def strip_qdq(graph: onnx.GraphProto, into: StrippedQDQ | None = None) -> StrippedQDQ:
    """Replace constant DequantizeLinear by float initializers and drop activation Q->DQ pairs.

    What was done is recorded in ``into`` (a new :class:`StrippedQDQ` when None), which is returned.
    """
    result = StrippedQDQ() if into is None else into
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output if o}
    graph_ins = {i.name for i in graph.input}
    graph_outs = {o.name for o in graph.output}
    drop: set[int] = set()
    alias: dict[str, str] = {}  # consumers' input name -> replacement
    rename: dict[str, str] = {}  # tensor renamed everywhere (the pair ends on a graph output)
    new_inits: list[onnx.TensorProto] = []
    for i, node in enumerate(graph.node):
        if node.op_type != "DequantizeLinear" or node.domain not in QDQ_DOMAINS or len(node.input) < 2:
            continue
        out = node.output[0]
        if all(n in inits for n in node.input if n):
            got = _dequantize_constant(node, inits)
            if isinstance(got, str):
                result.unsupported[out] = f"weight is DequantizeLinear {node.name or out}: {got}"
                continue
            value, qp = got
            new_inits.append(numpy_helper.from_array(value, out))
            if qp is not None:
                result.qparams[out] = qp
            drop.add(i)
            continue
        q = producer.get(node.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.domain not in QDQ_DOMAINS:
            continue
        src = q.input[0]
        if out in graph_outs:
            if src in graph_ins or src in graph_outs or src in rename:
                continue  # input -> Q -> DQ -> output: nothing to rewire, the pair stays
            rename[src] = out
        else:
            alias[out] = src
        drop.add(i)
        result.activation_pairs += 1

    def resolve(name: str) -> str:
        seen = set()
        while name in alias and name not in seen:
            seen.add(name)
            name = alias[name]
        return rename.get(name, name)

    kept = [n for i, n in enumerate(graph.node) if i not in drop]
    used = {resolve(n) for node in kept for n in node.input if n}
    final: list[onnx.NodeProto] = []
    for node in kept:  # a QuantizeLinear whose every DequantizeLinear went is dropped too
        if node.op_type == "QuantizeLinear" and node.domain in QDQ_DOMAINS and not any(
            o in used or o in graph_outs for o in node.output if o
        ):
            continue
        for j, n in enumerate(node.input):
            if n:
                node.input[j] = resolve(n)
        for j, n in enumerate(node.output):
            if n in rename:
                node.output[j] = rename[n]
        final.append(node)
    if len(final) == len(graph.node):
        return result
    new_nodes = [onnx.NodeProto() for _ in final]
    for dst, src_node in zip(new_nodes, final):
        dst.CopyFrom(src_node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    used = {n for node in graph.node for n in node.input if n} | graph_outs
    keep = [t for t in graph.initializer if t.name in used]
    gone = {t.name for t in graph.initializer} - {t.name for t in keep}
    del graph.initializer[:]
    graph.initializer.extend(keep)
    live = [vi for vi in graph.input if vi.name not in gone]
    del graph.input[:]
    graph.input.extend(live)
    del graph.value_info[:]  # shape inference runs again on the float graph
    return result


class StripQDQ(ProtoPass):
    """The pass: :func:`strip_qdq` on the main graph, recording into ``record`` (read by later passes)."""

    name = "strip-qdq"

    def __init__(self, record: StrippedQDQ | None = None) -> None:
        self.record = StrippedQDQ() if record is None else record

    def run(self, model: onnx.ModelProto) -> bool:
        nodes = len(model.graph.node)
        strip_qdq(model.graph, self.record)
        return len(model.graph.node) != nodes  # every edit removes a DequantizeLinear
