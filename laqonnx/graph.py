"""Graph stage: load and check an ONNX model, fold BatchNormalization, infer shapes, walk layers.

:func:`load_model` turns a path or ``ModelProto`` into a :class:`PreparedModel`: the float model
every later stage uses (checked, BN folded into the preceding Conv, shape-inferred, every node
named), its single input and output, and the weighted layers (Conv, ConvTranspose, Gemm, MatMul
with a constant operand) in topological order, each with its input shape at batch 1.

A quantized (QDQ) model is read as its dequantized float equivalent: a
``DequantizeLinear(initializer x, scale[, zero_point])`` is replaced by the float initializer
``(x - zero_point) * scale`` (computed by :func:`laqonnx.quantizers.dequantize`, as ONNX does),
and each layer records its weight's bits and quantization parameters. A
``QuantizeLinear -> DequantizeLinear`` pair on an activation is removed (treated as identity:
rounding is not Lipschitz, so the bound covers the dequantized weights without activation
rounding). ``load_model(..., allow_quantized=False)`` refuses quantized models instead.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ._qdq import count_quantized_nodes, strip_qdq
from .errors import ModelError
from .quant.numerics import QParams

__all__ = ["Layer", "SkippedNode", "PreparedModel", "load_model", "with_outputs", "WEIGHTED_OPS"]

WEIGHTED_OPS: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Layer:
    """One weighted node: a linear operator (plus bias) with a constant weight."""

    name: str
    op_type: str
    weight: str
    weight_shape: tuple[int, ...]
    bias: str | None
    input: str
    output: str
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    attrs: Mapping[str, Any] = field(hash=False)
    channel_axis: int
    index: int
    weight_bits: int | None = None  # None: a float weight
    weight_qparams: QParams | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def weight_quantized(self) -> bool:
        """True when the weight was stored quantized (a DequantizeLinear of initializers)."""
        return self.weight_bits is not None


@dataclass(frozen=True)
class SkippedNode:
    """A node of a weighted op type that is not analysed, and why."""

    name: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class PreparedModel:
    model: onnx.ModelProto = field(repr=False, compare=False)
    source: str | None
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    layers: tuple[Layer, ...]
    skipped: tuple[SkippedNode, ...]
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)
    quantized_nodes: int = 0  # quantization nodes in the model as read (QDQ or QOperator)
    activation_qdq_pairs: int = 0  # QuantizeLinear -> DequantizeLinear pairs removed (identity)
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def quantized(self) -> bool:
        """True when the model as read was already quantized."""
        return self.quantized_nodes > 0

    def initializer(self, name: str) -> np.ndarray:
        """The constant ``name`` (an initializer or a Constant node's value) as a numpy array."""
        if name not in self._arrays:
            for init in self.model.graph.initializer:
                if init.name == name:
                    self._arrays[name] = numpy_helper.to_array(init)
                    break
            else:
                value = _constant_nodes(self.model).get(name)
                if value is None:
                    raise KeyError(f"no initializer named {name!r}")
                self._arrays[name] = value
        return self._arrays[name]

    def weight(self, layer: Layer | str) -> np.ndarray:
        if isinstance(layer, str):
            found = [x for x in self.layers if x.name == layer]
            if not found:
                raise KeyError(f"no weighted layer named {layer!r}")
            layer = found[0]
        return self.initializer(layer.weight)

    def layer(self, name: str) -> Layer:
        for x in self.layers:
            if x.name == name:
                return x
        raise KeyError(f"no weighted layer named {name!r}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def _constant_nodes(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def resolve_input_shape(inp: onnx.ValueInfoProto, given: Sequence[int] | None) -> tuple[int, ...]:
    """The concrete batch-1 input shape from the model's declaration and the user's ``given``."""
    ttype = inp.type.tensor_type
    if not inp.type.HasField("tensor_type") or not ttype.HasField("shape"):
        if given is None:
            raise ModelError(f"input {inp.name!r} has no declared shape: pass an input shape, e.g. 1,3,224,224")
        return (1, *(int(d) for d in list(given)[1:]))
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?") for d in ttype.shape.dim]
    declared = "[" + ",".join(str(d) for d in dims) + "]"
    if given is not None:
        given = [int(d) for d in given]
        if len(given) != len(dims):
            raise ModelError(
                f"input shape {tuple(given)} has rank {len(given)} but model input {inp.name!r} is {declared} (rank {len(dims)})"
            )
        if any(d <= 0 for d in given):
            raise ModelError(f"input shape {tuple(given)} has a non-positive dimension")
        for axis, (g, d) in enumerate(zip(given, dims)):
            if axis > 0 and isinstance(d, int) and g != d:
                raise ModelError(
                    f"input shape {tuple(given)} contradicts model input {inp.name!r} {declared}: axis {axis} is {g}, the model says {d}"
                )
        return (1, *given[1:])
    out = [1]
    for axis, d in enumerate(dims[1:], start=1):
        if not isinstance(d, int):
            raise ModelError(
                f"model input {inp.name!r} {declared} has a dynamic size {d!r} on axis {axis}: pass an input shape (--input-shape), e.g. 1,3,224,224"
            )
        out.append(d)
    return tuple(out)


def _shape_map(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    g = proto.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
            if all(d is not None for d in dims):
                out[vi.name] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    return out


def concrete_shapes(proto: onnx.ModelProto, input_name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors at the concrete input ``shape``: onnx shape inference, then onnxruntime."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    del fixed.graph.value_info[:]
    for vi in fixed.graph.input:
        if vi.name == input_name:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in shape:
                dims.add().dim_value = d
    for vi in fixed.graph.output:  # the batch may be declared as a fixed size other than 1
        if vi.type.tensor_type.HasField("shape"):
            vi.type.tensor_type.ClearField("shape")
    try:
        fixed = onnx.shape_inference.infer_shapes(fixed, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelError(f"input shape {shape} does not fit the model: {_one_line(exc)}") from exc
    shapes = _shape_map(fixed)
    init_names = {t.name for t in fixed.graph.initializer}
    missing = [o for n in fixed.graph.node for o in n.output if o and o not in shapes and o not in init_names]
    if missing:
        shapes.update(_ort_shapes(fixed, input_name, shape, missing))
    return shapes


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the tensors ``names`` added as graph outputs (so onnxruntime
    returns intermediate activations); ``model`` is not modified."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    return out


def _ort_shapes(proto: onnx.ModelProto, input_name: str, shape: tuple[int, ...], names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes that shape inference could not resolve, by running onnxruntime once on zeros."""
    try:
        import onnxruntime as ort

        m = with_outputs(proto, names)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feed = {input_name: np.zeros(shape, dtype=np.float32)}
        outs = sess.run(names, feed)
    except Exception:  # shapes stay unknown; later stages fall back to shape-free bounds
        return {}
    return {n: tuple(int(d) for d in np.shape(v)) for n, v in zip(names, outs)}


def _read(model: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    if isinstance(model, onnx.ModelProto):
        return copy.deepcopy(model), None
    if not isinstance(model, (str, os.PathLike)):
        raise ModelError(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")
    path = Path(model)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"model path is a folder, not an ONNX file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise ModelError(f"{path} is not a readable ONNX model ({_one_line(exc)})") from exc
    return proto, str(path)


def _check(proto: onnx.ModelProto, source: str | None) -> None:
    where = source or "the model"
    if not proto.HasField("graph") or len(proto.graph.node) == 0 or proto.ir_version == 0:
        raise ModelError(f"{where} is not an ONNX model (no graph, or the file is truncated)")
    try:
        onnx.checker.check_model(proto)
    except ValueError:  # > 2 GB in memory: check from the file instead
        if source is None:
            raise ModelError(f"{where} is too large to check in memory: pass its path") from None
        try:
            onnx.checker.check_model(source)
        except Exception as exc:
            raise ModelError(f"{where} is not a valid ONNX model: {_one_line(exc)}") from exc
    except Exception as exc:
        raise ModelError(f"{where} is not a valid ONNX model: {_one_line(exc)}") from exc


def _name_nodes(graph: onnx.GraphProto) -> None:
    used: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in used:
            base = f"{node.op_type}_{i}"
            name, k = base, 1
            while name in used:
                name, k = f"{base}_{k}", k + 1
            node.name = name
        used.add(node.name)


def _skip_constant_identities(graph: onnx.GraphProto) -> None:
    """Remove Identity nodes that copy an initializer (torch exports them), rewiring their users."""
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {}
    for node in list(graph.node):
        if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in inits and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
            graph.node.remove(node)
    if alias:
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in alias:
                    node.input[i] = alias[name]


def _fold_batchnorm(graph: onnx.GraphProto, keep: frozenset[str] = frozenset()) -> None:
    """Fold BatchNormalization (inference mode, constant params) into the Conv that feeds it.

    Convs whose weight is in ``keep`` (dequantized weights) are not folded: the BN rule bounds them.
    """
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    removed: list[onnx.NodeProto] = []
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.output) != 1:
            continue
        if any(a.name == "training_mode" and a.i for a in bn.attribute):
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(conv.input) < 2:
            continue
        if consumers.get(conv.output[0], 0) != 1 or conv.output[0] in graph_outputs:
            continue
        params = bn.input[1:5]
        if not all(p in inits for p in params) or conv.input[1] not in inits or conv.input[1] in keep:
            continue
        if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits:
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + eps)
        w_init = inits[conv.input[1]]
        w = numpy_helper.to_array(w_init)
        bias = (
            numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(w.shape[0])
        )
        w_new = (w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
        b_new = ((bias - mean) * scale + beta).astype(w.dtype)
        w_name = conv.input[1] if consumers.get(conv.input[1], 0) == 1 else f"{conv.input[1]}_{bn.name}_folded"
        b_name = f"{conv.name or conv.output[0]}_bias_folded"
        while b_name in inits:
            b_name += "_"
        for name, arr in ((w_name, w_new), (b_name, b_new)):
            if name in inits:
                inits[name].CopyFrom(numpy_helper.from_array(arr, name))
            else:
                t = numpy_helper.from_array(arr, name)
                graph.initializer.append(t)
                inits[name] = graph.initializer[-1]
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[1], conv.input[2] = w_name, b_name
        conv.output[0] = bn.output[0]
        removed.append(bn)
    for bn in removed:
        graph.node.remove(bn)
    if removed:  # drop initializers nothing uses any more (the old BN params, unfolded weights)
        used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        del graph.value_info[:]


def _attr_dict(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv_attrs(node: onnx.NodeProto, wshape: tuple[int, ...], in_shape: tuple[int, ...] | None) -> dict[str, Any]:
    raw = _attr_dict(node)
    nd = len(wshape) - 2
    kernel = tuple(int(k) for k in raw.get("kernel_shape", wshape[2:]))
    strides = tuple(int(s) for s in raw.get("strides", [1] * nd))
    dil = tuple(int(d) for d in raw.get("dilations", [1] * nd))
    auto_pad = raw.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    attrs: dict[str, Any] = {
        "kernel_shape": kernel,
        "strides": strides,
        "dilations": dil,
        "group": int(raw.get("group", 1)),
        "auto_pad": auto_pad,
    }
    pads: tuple[int, ...] | None = tuple(int(p) for p in raw.get("pads", [0] * (2 * nd)))
    transpose = node.op_type == "ConvTranspose"
    if transpose:
        attrs["output_padding"] = tuple(int(p) for p in raw.get("output_padding", [0] * nd))
        if "output_shape" in raw:
            attrs["output_shape"] = tuple(int(p) for p in raw["output_shape"])
    if auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID") or (transpose and "output_shape" in raw):
        pads = _resolve_pads(attrs, in_shape, nd, transpose)
    attrs["pads"] = pads
    return attrs


def _resolve_pads(attrs: dict[str, Any], in_shape: tuple[int, ...] | None, nd: int, transpose: bool) -> tuple[int, ...] | None:
    if attrs["auto_pad"] == "VALID":
        return (0,) * (2 * nd)
    if in_shape is None:
        return None
    begin, end = [], []
    for i in range(nd):
        n, k, s, d = in_shape[2 + i], attrs["kernel_shape"][i], attrs["strides"][i], attrs["dilations"][i]
        keff = (k - 1) * d + 1
        if transpose:
            out = attrs.get("output_shape", [n * s] * nd)[i]
            total = max(0, s * (n - 1) + attrs["output_padding"][i] + keff - out)
        else:
            out = -(-n // s)
            total = max(0, (out - 1) * s + keff - n)
        small, large = total // 2, total - total // 2
        upper = attrs["auto_pad"] == "SAME_UPPER"  # ONNX: SAME_LOWER and (ConvTranspose) NOTSET put more first
        begin.append(small if upper else large)
        end.append(large if upper else small)
    return tuple(begin + end)


def _walk(
    graph: onnx.GraphProto,
    consts: set[str],
    shapes: Mapping[str, tuple[int, ...]],
    wshapes: Mapping[str, tuple[int, ...]],
    qparams: Mapping[str, QParams],
    unsupported: Mapping[str, str],
):
    layers: list[Layer] = []
    skipped: list[SkippedNode] = []
    for index, node in enumerate(graph.node):
        if node.op_type not in WEIGHTED_OPS or node.domain not in ("", "ai.onnx"):
            continue
        ins = list(node.input)
        const = [bool(n) and n in consts for n in ins]
        is_init = [bool(n) and n in wshapes for n in ins]

        def skip(reason: str) -> None:
            skipped.append(SkippedNode(node.name, node.op_type, reason))

        if len(ins) < 2:
            skip("fewer than two inputs")
            continue
        if const[0] and const[1]:
            skip("both operands are constant")
            continue
        widx = 1
        if node.op_type == "MatMul" and const[0] and not const[1]:
            widx = 0
        if not const[widx] and ins[widx] in unsupported:
            skip(unsupported[ins[widx]])
            continue
        if not const[widx]:
            skip("no constant weight operand (two activations)" if node.op_type in ("MatMul", "Gemm") else "weight is not a constant")
            continue
        if not is_init[widx]:
            skip("weight is computed (e.g. DequantizeLinear or Constant), not an initializer")
            continue
        if node.op_type == "Gemm" and widx != 1:
            skip("Gemm with a constant first operand")
            continue
        wname, act = ins[widx], ins[1 - widx]
        wshape = wshapes[wname]
        in_shape = shapes.get(act)
        attrs: dict[str, Any]
        bias = ins[2] if len(ins) > 2 and ins[2] else None
        if node.op_type in ("Conv", "ConvTranspose"):
            if len(wshape) < 3:
                skip(f"weight of rank {len(wshape)}")
                continue
            attrs = _conv_attrs(node, wshape, in_shape)
            axis = 0 if node.op_type == "Conv" else 1
        elif node.op_type == "Gemm":
            raw = _attr_dict(node)
            attrs = {k: raw.get(k, d) for k, d in (("transA", 0), ("transB", 0), ("alpha", 1.0), ("beta", 1.0))}
            axis = 0 if attrs["transB"] else 1
        else:
            if len(wshape) != 2:
                skip(f"MatMul weight of rank {len(wshape)} (only 2-D weights are supported)")
                continue
            attrs = {"weight_input": widx}
            axis = 1 if widx == 1 else 0
        layers.append(
            Layer(
                name=node.name,
                op_type=node.op_type,
                weight=wname,
                weight_shape=wshape,
                bias=bias,
                input=act,
                output=node.output[0],
                input_shape=in_shape,
                output_shape=shapes.get(node.output[0]),
                attrs=MappingProxyType(attrs),
                channel_axis=axis,
                index=index,
                weight_bits=qparams[wname].bits if wname in qparams else None,
                weight_qparams=qparams.get(wname),
            )
        )
    return tuple(layers), tuple(skipped)


def load_model(
    model: str | os.PathLike[str] | onnx.ModelProto,
    input_shape: Sequence[int] | None = None,
    *,
    allow_quantized: bool = True,
) -> PreparedModel:
    """Load, check and prepare a model for analysis and quantization.

    ``input_shape`` (batch first) is needed when the model's input has a dynamic size other than
    the batch; it must agree with every fixed dimension of the model. A quantized (QDQ) model is
    prepared as its dequantized float equivalent (see the module doc), or refused with
    ``allow_quantized=False`` (quantizing must start from the float model). Raises :class:`ModelError`.
    """
    proto, source = _read(model)
    _check(proto, source)
    graph = proto.graph
    n_quant = count_quantized_nodes(graph)
    if n_quant and not allow_quantized:
        raise ModelError(
            f"{source or 'the model'} is already quantized ({n_quant} QuantizeLinear/DequantizeLinear or QLinear nodes): "
            "quantize the float model instead"
        )
    stripped = strip_qdq(graph)
    _name_nodes(graph)
    _skip_constant_identities(graph)
    _fold_batchnorm(graph, frozenset(stripped.qparams))
    init_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise ModelError(f"{source or 'the model'} has {len(inputs)} inputs; laqonnx analyses single-input models")
    if not graph.output:
        raise ModelError(f"{source or 'the model'} has no outputs")
    inp = inputs[0]
    shape = resolve_input_shape(inp, input_shape)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:
        raise ModelError(f"shape inference failed on {source or 'the model'}: {_one_line(exc)}") from exc
    shapes = concrete_shapes(proto, inp.name, shape)
    wshapes = {t.name: tuple(int(d) for d in t.dims) for t in proto.graph.initializer}
    consts = set(wshapes) | set(_constant_nodes(proto))
    layers, skipped = _walk(proto.graph, consts, shapes, wshapes, stripped.qparams, stripped.unsupported)
    if not layers:
        why = f" ({len(skipped)} skipped: {skipped[0].name} {skipped[0].reason})" if skipped else ""
        if n_quant and not skipped:
            why = " (QOperator-format quantized models, QLinearConv/ConvInteger, are not supported: use a QDQ model)"
        raise ModelError(
            f"{source or 'the model'} has no weighted layers (Conv, ConvTranspose, Gemm, MatMul with a constant operand){why}"
        )
    return PreparedModel(
        model=proto,
        source=source,
        input_name=inp.name,
        input_shape=shape,
        output_name=proto.graph.output[0].name,
        layers=layers,
        skipped=skipped,
        shapes=MappingProxyType(dict(shapes)),
        quantized_nodes=n_quant,
        activation_qdq_pairs=stripped.activation_pairs,
    )
