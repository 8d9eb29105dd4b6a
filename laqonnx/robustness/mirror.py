"""A differentiable PyTorch mirror of an ONNX graph, QDQ included.

Our own small interpreter (onnx2torch is unusable here): :class:`Mirror` holds the initializers as
buffers and evaluates the topologically sorted graph node by node through a registry of per-op
handlers (``@register("Conv")``). QuantizeLinear/DequantizeLinear are *fake-quant*: the forward
pass computes exactly what onnxruntime computes (``x / scale``, round half to even, ``+ zero
point``, saturate to the type's range; scale and zero point per tensor, per axis, or blocked
along an axis as opset 21's ``block_size`` writes int4 weights), the backward pass is a
straight-through estimator:

- ``ste="clipped"`` (default): gradient 1 where the rounded value lies inside the type's range,
  0 where it saturates (the gradient of the clamp, with rounding treated as identity);
- ``ste="identity"``: gradient 1 everywhere.

An op without a handler raises :class:`~laqonnx.errors.ModelError` naming the op.
The other handlers live in ``_ops`` (linear algebra, arithmetic, shape and layout), ``_ops_conv``
(convolution, pooling, batch norm), ``_ops_math`` (elementwise math, activations, comparisons),
``_ops_tensor`` (reductions, Expand/Tile/Split, generators, LayerNorm, Einsum) and ``_ops_resize``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import ModelError

__all__ = ["Mirror", "build_mirror", "mirror_classifier", "fake_quantize", "register", "supported_ops", "NodeContext", "STE", "QRANGE"]

STE = Literal["clipped", "identity"]

# ONNX integer element type -> (qmin, qmax)
QRANGE: dict[int, tuple[int, int]] = {
    onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT16: (-32768, 32767),
    onnx.TensorProto.UINT16: (0, 65535),
    onnx.TensorProto.INT4: (-8, 7),
    onnx.TensorProto.UINT4: (0, 15),
    onnx.TensorProto.INT32: (-(2**31), 2**31 - 1),
}

_TORCH_DTYPE: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int32,
    onnx.TensorProto.UINT16: torch.int32,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT4: torch.int8,
    onnx.TensorProto.UINT4: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}

Handler = Callable[["NodeContext", list[Any]], Sequence[Any]]
_HANDLERS: dict[tuple[str, str], Handler] = {}


def register(op_type: str, domain: str = "") -> Callable[[Handler], Handler]:
    """Register a torch handler for ``op_type`` (in ``domain``; "" is the ONNX default domain)."""

    def deco(fn: Handler) -> Handler:
        _HANDLERS[(_norm_domain(domain), op_type)] = fn
        return fn

    return deco


def supported_ops() -> frozenset[str]:
    """Op types the mirror can evaluate (``domain:op`` for non-default domains)."""
    return frozenset(op if not dom else f"{dom}:{op}" for dom, op in _HANDLERS)


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


@dataclass
class NodeContext:
    """What a handler sees besides its inputs: the node's attributes and the model's facts."""

    node: onnx.NodeProto
    attrs: dict[str, Any]
    opset: int
    elem_types: Mapping[str, int]  # ONNX element type of every initializer / known value
    ste: str = "clipped"
    _extra: dict[str, Any] = field(default_factory=dict)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def input_elem_type(self, index: int) -> int | None:
        if index >= len(self.node.input) or not self.node.input[index]:
            return None
        return self.elem_types.get(self.node.input[index])

    def fail(self, why: str) -> ModelError:
        return ModelError(f"node {self.node.name or self.node.output[0]!r} ({self.node.op_type}): {why}")


def _attr_value(a: onnx.AttributeProto) -> Any:
    value = onnx.helper.get_attribute_value(a)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, onnx.TensorProto):
        return _to_torch(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8") for v in value]
    return value


def _to_torch(t: onnx.TensorProto) -> torch.Tensor:
    arr = numpy_helper.to_array(t)
    dtype = _TORCH_DTYPE.get(t.data_type)
    if dtype is None:
        raise ModelError(f"tensor {t.name!r} has unsupported element type {t.data_type}")
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT16,
                       onnx.TensorProto.UINT16):
        arr = arr.astype(np.int32)
    return torch.from_numpy(np.array(arr, copy=True)).to(dtype)


def _toposort(graph: onnx.GraphProto, known: set[str]) -> list[onnx.NodeProto]:
    produced_by: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                produced_by[out] = i
    order: list[onnx.NodeProto] = []
    state = [0] * len(graph.node)  # 0 new, 1 visiting, 2 done
    for start in range(len(graph.node)):
        stack = [(start, 0)]
        while stack:
            i, k = stack.pop()
            if state[i] == 2:
                continue
            state[i] = 1
            deps = [produced_by[n] for n in graph.node[i].input if n and n not in known and n in produced_by]
            if k < len(deps):
                stack.append((i, k + 1))
                j = deps[k]
                if state[j] == 1:
                    raise ModelError(f"the graph has a cycle through node {graph.node[j].name!r}")
                if state[j] == 0:
                    stack.append((j, 0))
                continue
            state[i] = 2
            order.append(graph.node[i])
    return order


class Mirror(torch.nn.Module):
    """Evaluate an ONNX classifier in PyTorch, differentiably; ``forward(x) -> first output``."""

    def __init__(self, model: onnx.ModelProto, *, ste: STE = "clipped") -> None:
        super().__init__()
        if ste not in ("clipped", "identity"):
            raise ValueError(f"ste must be 'clipped' or 'identity', not {ste!r}")
        graph = model.graph
        self.ste = ste
        self.opset = next((o.version for o in model.opset_import if _norm_domain(o.domain) == ""), 13)
        init_names = {t.name for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in init_names]
        if len(inputs) != 1:
            raise ModelError(f"expected a model with exactly one data input, found {len(inputs)}: {inputs}")
        self.input_name = inputs[0]
        in_dims = next(i for i in graph.input if i.name == self.input_name).type.tensor_type.shape.dim
        self.fixed_batch = in_dims[0].dim_value if len(in_dims) and in_dims[0].dim_value > 0 else None
        self.output_name = graph.output[0].name
        self._buffer_of: dict[str, str] = {}
        elem_types: dict[str, int] = {}
        for k, t in enumerate(graph.initializer):
            attr = f"init_{k}"
            self.register_buffer(attr, _to_torch(t), persistent=False)
            self._buffer_of[t.name] = attr
            elem_types[t.name] = t.data_type
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            if vi.type.HasField("tensor_type"):
                elem_types.setdefault(vi.name, vi.type.tensor_type.elem_type)
        self._nodes: list[tuple[onnx.NodeProto, Handler, NodeContext]] = []
        missing: list[str] = []
        for node in _toposort(graph, set(init_names) | {self.input_name}):
            key = (_norm_domain(node.domain), node.op_type)
            handler = _HANDLERS.get(key)
            if handler is None:
                missing.append(node.op_type if not key[0] else f"{key[0]}:{node.op_type}")
                continue
            attrs = {a.name: _attr_value(a) for a in node.attribute}
            if node.op_type == "Constant" and node.output:
                # known element type lets a following QuantizeLinear see its zero point's type
                for a in node.attribute:
                    if a.name == "value":
                        elem_types[node.output[0]] = a.t.data_type
            ctx = NodeContext(node=node, attrs=attrs, opset=self.opset, elem_types=elem_types, ste=ste)
            self._nodes.append((node, handler, ctx))
        if missing:
            names = ", ".join(sorted(set(missing)))
            raise ModelError(f"the robustness mirror does not support op(s): {names}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = self.fixed_batch
        if step is None or len(x) == step:
            return self._run(x)
        outs = []
        for i in range(0, len(x), step):  # a fixed batch axis (e.g. Reshape to [1, -1]): run in chunks
            chunk = x[i:i + step]
            n = len(chunk)
            if n < step:
                chunk = torch.cat([chunk, chunk[-1:].expand(step - n, *chunk.shape[1:])])
            outs.append(self._run(chunk)[:n])
        return torch.cat(outs)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, Any] = {name: getattr(self, attr) for name, attr in self._buffer_of.items()}
        values[self.input_name] = x
        for node, handler, ctx in self._nodes:
            args = [values[n] if n else None for n in node.input]
            outs = handler(ctx, args)
            for name, value in zip(node.output, outs):
                if name:
                    values[name] = value
        if self.output_name not in values:
            raise ModelError(f"the graph never computes its output {self.output_name!r}")
        return values[self.output_name]


def build_mirror(model: str | os.PathLike[str] | onnx.ModelProto, *, ste: STE = "clipped") -> Mirror:
    """Load ``model`` (path or proto) and build its :class:`Mirror` in eval mode."""
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(os.fspath(model))
        except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError, Exception) as exc:  # noqa: BLE001
            raise ModelError(f"cannot load ONNX model {model}: {exc}") from exc
    return Mirror(model, ste=ste).eval()


def mirror_classifier(mirror: torch.nn.Module, input_shape: tuple[int, ...], nb_classes: int,
                      clip_values: tuple[float, float] = (0.0, 1.0), channels_first: bool = True) -> Any:
    """ART ``PyTorchClassifier`` over a mirror: logits, cross-entropy loss, CPU; ``clip_values`` is the
    model's input range, ``channels_first=False`` for an (H, W, C) input."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=mirror,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=int(nb_classes),
        clip_values=clip_values,
        channels_first=bool(channels_first),
        device_type="cpu",
    )


# --------------------------------------------------------------------------------------------
# fake-quant: QuantizeLinear / DequantizeLinear (default and com.microsoft domains)


def _axis_view(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Reshape a per-axis 1-D parameter so it broadcasts along ``axis`` of ``x``."""
    if t.dim() == 1 and t.numel() > 1:
        shape = [1] * x.dim()
        shape[axis % x.dim()] = t.numel()
        return t.reshape(shape)
    return t


def _param_view(ctx: NodeContext, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Scale or zero point shaped to broadcast over ``x``: per tensor, per ``axis``, or blocked.

    Blocked (opset 21 ``block_size`` > 0): ``t`` has ``x``'s rank, ``ceil(D / block_size)`` along
    ``axis`` and ``x``'s size elsewhere; each entry covers ``block_size`` consecutive elements of
    ``x`` along ``axis`` (the last block may be ragged).
    """
    block = int(ctx.attr("block_size", 0) or 0)
    if block <= 0:
        return _axis_view(t, x, int(ctx.attr("axis", 1)))
    axis = int(ctx.attr("axis", 1)) % max(x.dim(), 1)
    want = list(x.shape)
    if x.dim():
        want[axis] = -(-x.shape[axis] // block)
    if list(t.shape) != want:
        raise ctx.fail(f"blocked quantization (block_size {block}, axis {axis}) needs scale/zero point of shape "
                       f"{want} for input {list(x.shape)}, got {list(t.shape)}")
    return t.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])


def _quant_range(ctx: NodeContext, zero_point: Any) -> tuple[int, int]:
    etype = ctx.input_elem_type(2)
    if etype is None and zero_point is not None and isinstance(zero_point, torch.Tensor):
        etype = {torch.int8: onnx.TensorProto.INT8, torch.uint8: onnx.TensorProto.UINT8}.get(zero_point.dtype)
    if etype is None:
        etype = int(ctx.attr("output_dtype", 0) or onnx.TensorProto.UINT8)
    if etype not in QRANGE:
        raise ctx.fail(f"quantized element type {etype} is not supported")
    return QRANGE[etype]


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                  qmin: int, qmax: int, ste: str = "clipped") -> torch.Tensor:
    """``saturate(round_half_even(x / scale) + zp)`` as float, with a straight-through gradient."""
    y = x / scale
    r = y + (torch.round(y) - y).detach()  # round half to even forward, identity backward
    if zero_point is not None:
        r = r + zero_point.to(r.dtype)
    if ste == "identity":
        return r + (torch.clamp(r, qmin, qmax) - r).detach()
    return torch.clamp(r, qmin, qmax)


@register("QuantizeLinear")
@register("QuantizeLinear", "com.microsoft")
def _quantize_linear(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x, scale = a[0], a[1]
    zp = a[2] if len(a) > 2 else None
    qmin, qmax = _quant_range(ctx, zp)
    s = _param_view(ctx, scale.to(x.dtype), x)
    z = _param_view(ctx, zp, x) if zp is not None else None
    return [fake_quantize(x, s, z, qmin, qmax, ctx.ste)]


@register("DequantizeLinear")
@register("DequantizeLinear", "com.microsoft")
def _dequantize_linear(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x, scale = a[0], a[1]
    zp = a[2] if len(a) > 2 else None
    xf = x.to(scale.dtype) if not x.is_floating_point() else x
    s = _param_view(ctx, scale, xf)
    if zp is not None:
        xf = xf - _param_view(ctx, zp, xf).to(xf.dtype)
    return [xf * s]


from . import _ops, _ops_conv, _ops_math, _ops_resize, _ops_tensor  # noqa: E402,F401  (register the rest)
