"""int4 MatMul/Gemm weights in the form onnxruntime fuses into ``com.microsoft.MatMulNBits``.

onnxruntime's QDQ optimizer (``DQMatMulToMatMulNBits``, basic level and up on the CPU provider)
replaces ``DequantizeLinear(int4/uint4 constant) -> MatMul`` by its fused low-bit kernel when the
``DequantizeLinear`` feeds the MatMul's **B** input, holds a constant 2-D ``(K, N)`` weight, and is
block-wise on axis 0 with a power-of-two block >= 16, or per-channel over the N columns (axis 1).
The quantizer writes ``DequantizeLinear(int4) -> Gemm`` (weight ``(N, K)`` with ``transB=1``), which
it leaves unfused: an int4 Gemm then runs as a float Gemm behind a dequantization of its weight on
every call. :func:`to_nbits_form` rewrites those layers after lowering:

* ``Gemm(A, DQ(Wq), C)`` (``alpha = beta = 1``, ``transA = 0``) -> ``Sum(MatMul(A, DQ(Wq')), C)``
  with ``Wq'`` the ``(K, N)`` layout (``Wq`` transposed when ``transB = 1``); a ``MatMul`` keeps its node.
  The bias is added by ``Sum`` (same broadcasting, same kernel cost): onnxruntime's ``MatMulAddFusion``
  runs before the QDQ fusions and would turn a ``MatMul -> Add`` back into a Gemm, which is not fused.
  A MatMul layer's output QDQ pair (its Add quantized on its own) is dropped when its range reaches
  below 0 (``DQ -> MatMul -> Q`` and ``MatMul -> Clip`` are not fused; such a pair clamps no removed Relu); a MatMul layer whose only reader is an ``Add`` (its bias, in the source model) gets that Add as a Sum too.
* the layer reads its input in float: the ``QuantizeLinear -> DequantizeLinear`` pair the quantizer put
  on it becomes a ``Clip`` to the pair's range (the pair may stand for a Relu/Clip the quantizer
  removed), and the pair is dropped if nothing else reads it. onnxruntime otherwise takes
  ``DQ(activation), DQ(int4 weight) -> MatMul`` for a QDQ MatMul group, which its CPU provider has no
  int4 kernel for, and runs it in float. MatMulNBits quantizes its input itself (int8, block-wise,
  ``accuracy_level`` 4), so the input is still read at 8 bits, with finer scales.
* the weight's planned scales are written per column (axis 1; a per-tensor scale repeated over the
  columns: the same numbers), or with ``NBits(block_size=B)`` re-quantized block-wise over K from the
  float weight (symmetric max-abs per block of B rows, ``[-7, 7]``; K must be a multiple of B).

Rules are per ``(domain, op)``: :data:`REWRITES`. A layer that does not qualify is left as written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import OptionError

__all__ = ["REWRITES", "NBits", "pack_int4", "to_nbits_form"]

_INT4 = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


@dataclass(frozen=True)
class NBits:
    """How int4 MatMul/Gemm weights are written. ``block_size``: None keeps the planned per-channel
    (or per-tensor) scales; a power of two >= 16 re-quantizes block-wise over K (finer scales, more
    bytes: one float32 scale per B weights)."""

    block_size: int | None = None

    def __post_init__(self) -> None:
        b = self.block_size
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 16 or b & (b - 1)):
            raise OptionError(f"block_size must be a power of two >= 16 (or None: per-channel), got {b!r}")


def pack_int4(values: np.ndarray, name: str, signed: bool = True) -> onnx.TensorProto:
    """An INT4/UINT4 initializer from integer values (two per byte, low nibble first, as ONNX stores them)."""
    flat = np.asarray(values).astype(np.int16).ravel() & 0xF
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, flat.dtype)])
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, _INT4[0] if signed else _INT4[1], list(np.shape(values)), packed.tobytes(), raw=True)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


@dataclass
class _Graph:
    model: onnx.ModelProto
    inits: dict[str, onnx.TensorProto]
    producer: dict[str, onnx.NodeProto]
    uses: dict[str, int]


def _weight_kn(g: _Graph, node: onnx.NodeProto, trans_b: bool):
    """The int4 DequantizeLinear feeding ``node``'s B input, as (dq node, q (K, N), scale (N,) or (), zero point, signed)."""
    if len(node.input) < 2:
        return None
    dq = g.producer.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or g.uses.get(node.input[1], 0) != 1:
        return None
    q_init = g.inits.get(dq.input[0])
    s_init = g.inits.get(dq.input[1]) if len(dq.input) > 1 else None
    if q_init is None or s_init is None or q_init.data_type not in _INT4 or len(q_init.dims) != 2:
        return None
    if _attr(dq, "block_size", 0):
        return None  # already block-wise: written as onnxruntime wants it or not ours to change
    q = numpy_helper.to_array(q_init).astype(np.int8 if q_init.data_type == _INT4[0] else np.uint8)
    scale = numpy_helper.to_array(s_init).astype(np.float32)
    zp = numpy_helper.to_array(g.inits[dq.input[2]]).astype(np.int32) if len(dq.input) > 2 and dq.input[2] in g.inits else None
    if zp is not None and zp.shape != scale.shape:
        return None
    axis = _attr(dq, "axis", 1) % 2
    if scale.ndim == 1:
        out_axis = 0 if trans_b else 1  # the N axis of the stored weight
        if axis != out_axis or scale.shape[0] != q.shape[out_axis]:
            return None
    elif scale.ndim != 0:
        return None
    if trans_b:
        q = q.T
    return dq, np.ascontiguousarray(q), scale, zp, q_init.data_type == _INT4[0]


def _new_dq(g: _Graph, dq: onnx.NodeProto, q: np.ndarray, scale: np.ndarray, zp, signed: bool,
            floats: np.ndarray | None, nbits: NBits) -> list[onnx.NodeProto] | None:
    k, n = q.shape
    base = dq.input[0]
    if nbits.block_size is not None and floats is not None and k % nbits.block_size == 0 and k >= nbits.block_size:
        b = nbits.block_size
        w = floats.reshape(k // b, b, n)
        maxabs = np.abs(w).max(axis=1).astype(np.float32)
        s = (maxabs.astype(np.float64) / 7.0).astype(np.float32)
        s = np.where(s < np.finfo(np.float32).tiny, np.float32(1.0), s).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            qb = np.clip(np.rint(w / s[:, None, :]), -8, 7).reshape(k, n).astype(np.int8)
        inits = [pack_int4(qb, f"{base}_kn"), numpy_helper.from_array(s, f"{base}_kn_scale")]
        attrs = {"axis": 0, "block_size": b}
        ins = [inits[0].name, inits[1].name]
    else:
        cols = np.broadcast_to(scale, (n,)).astype(np.float32).copy()
        inits = [pack_int4(q, f"{base}_kn", signed), numpy_helper.from_array(cols, f"{base}_kn_scale")]
        ins = [inits[0].name, inits[1].name]
        if zp is not None:
            z = np.broadcast_to(zp, (n,))
            inits.append(pack_int4(z, f"{base}_kn_zero_point", signed))
            ins.append(inits[2].name)
        attrs = {"axis": 1}
    for t in inits:
        if t.name in g.inits:
            return None
        g.model.graph.initializer.append(t)
        g.inits[t.name] = t
    return [helper.make_node("DequantizeLinear", ins, list(dq.output), name=dq.name or f"{base}_DequantizeLinear", **attrs)]


def _gemm(g: _Graph, node: onnx.NodeProto, floats: Mapping[str, np.ndarray], nbits: NBits) -> list[onnx.NodeProto] | None:
    if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0 or _attr(node, "transA", 0):
        return None
    trans_b = bool(_attr(node, "transB", 0))
    return _rewrite(g, node, trans_b, floats, nbits, bias=node.input[2] if len(node.input) > 2 and node.input[2] else None)


def _matmul(g: _Graph, node: onnx.NodeProto, floats: Mapping[str, np.ndarray], nbits: NBits) -> list[onnx.NodeProto] | None:
    new = _rewrite(g, node, False, floats, nbits, bias=None)
    readers = [n for n in g.model.graph.node if node.output[0] in n.input]
    if new is not None and len(readers) == 1 and readers[0].op_type == "QuantizeLinear":
        # an output QDQ pair (the source model's Add, quantized on its own): onnxruntime fuses neither
        # DQ -> MatMul -> Q nor MatMul -> Clip into MatMulNBits; a pair whose range reaches below 0 stands
        # for no removed Relu/Clip, so it is dropped (the output is read in float)
        dqs = [n for n in g.model.graph.node if n.op_type == "DequantizeLinear" and readers[0].output[0] in n.input[:1]]
        if len(dqs) == 1:
            g.producer[readers[0].output[0]] = readers[0]
            _, clip = _float_input(g, dqs[0].output[0])
            if clip and float(numpy_helper.to_array(g.inits[clip[0].input[1]])) < 0:
                name = node.output[0]
                for n in g.model.graph.node:
                    n.input[:] = [name if i == dqs[0].output[0] else i for i in n.input]
                quant = readers[0]
                readers = [n for n in g.model.graph.node if name in n.input and n is not quant]
    if new is not None and len(readers) == 1 and (readers[0].domain or "", readers[0].op_type) == ("", "Add"):
        readers[0].op_type = "Sum"  # the same sum of two tensors, which MatMulAddFusion leaves alone
    return new


def _rewrite(g: _Graph, node, trans_b: bool, floats, nbits: NBits, bias: str | None) -> list[onnx.NodeProto] | None:
    found = _weight_kn(g, node, trans_b)
    if found is None:
        return None
    dq, q, scale, zp, signed = found
    w = _float_weight(g, dq, floats, trans_b)
    new = _new_dq(g, dq, q, scale, zp, signed, w, nbits)
    if new is None:
        return None
    g.model.graph.node.remove(dq)
    out = node.output[0]
    mm_out = f"{out}_matmul" if bias else out
    a, clip = _float_input(g, node.input[0])
    nodes = [*clip, *new, helper.make_node("MatMul", [a, node.input[1]], [mm_out], name=node.name)]
    if bias:
        # Sum, not Add: onnxruntime's MatMulAddFusion (which runs first) would turn MatMul + Add back into a Gemm
        nodes.append(helper.make_node("Sum", [mm_out, bias], [out], name=f"{node.name}_bias"))
    return nodes


_QRANGE = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
           onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767)}


def _float_input(g: _Graph, name: str) -> tuple[str, list[onnx.NodeProto]]:
    """The input read in float: a ``QuantizeLinear -> DequantizeLinear`` pair on ``name`` becomes a
    ``Clip`` to the pair's representable range (the quantizer drops a Relu/Clip whose clamp its
    quantization range already does, so the clamp must stay). Else ``name`` as it is."""
    dq = g.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2:
        return name, []
    q = g.producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or list(q.input[1:]) != list(dq.input[1:]):
        return name, []
    s_init = g.inits.get(dq.input[1])
    z_init = g.inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if s_init is None or (len(dq.input) > 2 and dq.input[2] and z_init is None):
        return name, []
    scale = numpy_helper.to_array(s_init).astype(np.float32)
    if scale.ndim:
        return name, []
    ztype = z_init.data_type if z_init is not None else onnx.TensorProto.UINT8
    if ztype not in _QRANGE:
        return name, []
    zp = int(numpy_helper.to_array(z_init)) if z_init is not None else 0
    qmin, qmax = _QRANGE[ztype]
    lo, hi = (np.float32(qmin - zp) * scale, np.float32(qmax - zp) * scale)
    out = f"{q.input[0]}_float_clip"
    if out in g.inits or out in g.producer:
        return out, []
    bounds = [numpy_helper.from_array(np.asarray(lo, np.float32), f"{out}_min"),
              numpy_helper.from_array(np.asarray(hi, np.float32), f"{out}_max")]
    for t in bounds:
        g.model.graph.initializer.append(t)
        g.inits[t.name] = t
    clip = helper.make_node("Clip", [q.input[0], bounds[0].name, bounds[1].name], [out], name=out)
    g.producer[out] = clip
    return out, [clip]


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes none of whose outputs is read (by a node or as a graph output), repeatedly."""
    while True:
        used = {o.name for o in model.graph.output} | {i for n in model.graph.node for i in n.input}
        keep = [n for n in model.graph.node if any(o in used for o in n.output)]
        if len(keep) == len(model.graph.node):
            return
        del model.graph.node[:]
        model.graph.node.extend(keep)


def _float_weight(g: _Graph, dq: onnx.NodeProto, floats: Mapping[str, np.ndarray], trans_b: bool) -> np.ndarray | None:
    """The float weight behind ``dq`` in (K, N) layout (the quantizer names its weight ``<name>_quantized``)."""
    name = dq.input[0]
    for key in (name, name.removesuffix("_quantized")):
        if key in floats:
            w = np.asarray(floats[key], dtype=np.float32)
            return np.ascontiguousarray(w.T if trans_b else w)
    return None


Rewrite = Callable[[_Graph, onnx.NodeProto, Mapping[str, np.ndarray], NBits], "list[onnx.NodeProto] | None"]
REWRITES: dict[tuple[str, str], Rewrite] = {("", "Gemm"): _gemm, ("", "MatMul"): _matmul}


def to_nbits_form(model: onnx.ModelProto, floats: Mapping[str, np.ndarray] | None = None,
                  nbits: NBits | None = None) -> list[str]:
    """Rewrite, in place, the int4 MatMul/Gemm layers of a lowered model into the form onnxruntime fuses
    into MatMulNBits (see the module doc); ``floats``: weight name -> float values (for block-wise
    re-quantization). Returns the names of the rewritten nodes."""
    nbits = nbits or NBits()
    floats = floats or {}
    g = _Graph(model, {t.name: t for t in model.graph.initializer}, {}, {})
    for n in model.graph.node:
        for o in n.output:
            g.producer[o] = n
        for i in n.input:
            g.uses[i] = g.uses.get(i, 0) + 1
    for o in model.graph.output:
        g.uses[o.name] = g.uses.get(o.name, 0) + 1
    done: list[str] = []
    for node in list(model.graph.node):
        rule = REWRITES.get((node.domain or "", node.op_type))
        if rule is None:
            continue
        new = rule(g, node, floats, nbits)
        if new is None:
            continue
        nodes = list(model.graph.node)
        at = nodes.index(node)
        nodes[at:at + 1] = new
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        done.append(node.name)
    if done:
        _drop_dead_nodes(model)
    return done
