"""The weighted-layer walk: every Conv, ConvTranspose, Gemm and MatMul with a constant weight.

A registry keyed by ``(domain, op_type)`` says, per weighted op, which operand may be the weight,
its attributes (pads resolved from ``auto_pad`` at the concrete input shape) and its output-channel
axis, or why the node is skipped. :func:`walk` visits the graph in order and returns the layers
(with their input/output shapes) and the skipped nodes with their reasons.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import onnx

from ..quant.numerics import QParams
from .model import Layer, SkippedNode

__all__ = ["WEIGHTED_OPS", "LayerRule", "LAYER_RULES", "walk"]

Shape = tuple[int, ...]
# (node, weight operand index, weight shape, activation shape) -> (attrs, channel axis), or why not
AttrsFn = Callable[[onnx.NodeProto, int, Shape, "Shape | None"], "tuple[dict[str, Any], int] | str"]


@dataclass(frozen=True)
class LayerRule:
    """How one weighted op is read: its attributes and channel axis, and whether operand 0 may be the weight."""

    attrs: AttrsFn
    weight_first: bool = False


def _attr_dict(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _resolve_pads(attrs: dict[str, Any], in_shape: Shape | None, nd: int, transpose: bool) -> tuple[int, ...] | None:
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


def _conv(node: onnx.NodeProto, widx: int, wshape: Shape, in_shape: Shape | None) -> tuple[dict[str, Any], int] | str:
    if len(wshape) < 3:
        return f"weight of rank {len(wshape)}"
    raw = _attr_dict(node)
    nd = len(wshape) - 2
    auto_pad = raw.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    attrs: dict[str, Any] = {
        "kernel_shape": tuple(int(k) for k in raw.get("kernel_shape", wshape[2:])),
        "strides": tuple(int(s) for s in raw.get("strides", [1] * nd)),
        "dilations": tuple(int(d) for d in raw.get("dilations", [1] * nd)),
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
    return attrs, 1 if transpose else 0


def _gemm(node: onnx.NodeProto, widx: int, wshape: Shape, in_shape: Shape | None) -> tuple[dict[str, Any], int] | str:
    raw = _attr_dict(node)
    attrs = {k: raw.get(k, d) for k, d in (("transA", 0), ("transB", 0), ("alpha", 1.0), ("beta", 1.0))}
    return attrs, 0 if attrs["transB"] else 1


def _matmul(node: onnx.NodeProto, widx: int, wshape: Shape, in_shape: Shape | None) -> tuple[dict[str, Any], int] | str:
    if len(wshape) != 2:
        return f"MatMul weight of rank {len(wshape)} (only 2-D weights are supported)"
    return {"weight_input": widx}, 1 if widx == 1 else 0


LAYER_RULES: Mapping[tuple[str, str], LayerRule] = MappingProxyType({
    ("", "Conv"): LayerRule(_conv),
    ("", "ConvTranspose"): LayerRule(_conv),
    ("", "Gemm"): LayerRule(_gemm),
    ("", "MatMul"): LayerRule(_matmul, weight_first=True),
})
WEIGHTED_OPS: tuple[str, ...] = tuple(op for _, op in LAYER_RULES)


def walk(
    graph: onnx.GraphProto,
    consts: set[str],
    shapes: Mapping[str, Shape],
    wshapes: Mapping[str, Shape],
    qparams: Mapping[str, QParams],
    unsupported: Mapping[str, str],
) -> tuple[tuple[Layer, ...], tuple[SkippedNode, ...]]:
    """The weighted layers of ``graph`` in order, and the weighted-op nodes skipped (with why).

    ``consts``: every constant tensor; ``wshapes``: initializer shapes (a weight must be one);
    ``qparams``: dequantized weights' quantization; ``unsupported``: DequantizeLinear outputs kept as nodes.
    """
    layers: list[Layer] = []
    skipped: list[SkippedNode] = []
    for index, node in enumerate(graph.node):
        rule = LAYER_RULES.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))
        if rule is None:
            continue
        ins = list(node.input)
        const = [bool(n) and n in consts for n in ins]

        def skip(reason: str) -> None:
            skipped.append(SkippedNode(node.name, node.op_type, reason))

        if len(ins) < 2:
            skip("fewer than two inputs")
            continue
        if const[0] and const[1]:
            skip("both operands are constant")
            continue
        widx = 0 if rule.weight_first and const[0] and not const[1] else 1
        if not const[widx] and ins[widx] in unsupported:
            skip(unsupported[ins[widx]])
            continue
        if not const[widx]:
            skip("no constant weight operand (two activations)" if node.op_type in ("MatMul", "Gemm") else "weight is not a constant")
            continue
        if ins[widx] not in wshapes:
            skip("weight is computed (e.g. DequantizeLinear or Constant), not an initializer")
            continue
        wname, act = ins[widx], ins[1 - widx]
        wshape = wshapes[wname]
        in_shape = shapes.get(act)
        got = rule.attrs(node, widx, wshape, in_shape)
        if isinstance(got, str):
            skip(got)
            continue
        attrs, axis = got
        layers.append(
            Layer(
                name=node.name,
                op_type=node.op_type,
                weight=wname,
                weight_shape=wshape,
                bias=ins[2] if len(ins) > 2 and ins[2] else None,
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
