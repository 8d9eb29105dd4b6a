"""Torch handlers of the mirror: linear algebra, elementwise, activations, shape and layout ops.

Each handler gets the node's context and its evaluated inputs (``None`` for an omitted optional
input) and returns the list of its outputs. Shapes are concrete (eager evaluation), so shape
arithmetic (Shape, Gather, Concat of int64 tensors, Reshape) simply runs on small int tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ._ops_conv import _ints, _torch_pad
from .mirror import _TORCH_DTYPE, NodeContext, register

__all__: list[str] = []

# ---------------------------------------------------------------- linear algebra, arithmetic


@register("Gemm")
def _gemm(ctx: NodeContext, a: list[Any]) -> list[Any]:
    A, B = a[0], a[1]
    C = a[2] if len(a) > 2 else None
    if ctx.attr("transA", 0):
        A = A.t()
    if ctx.attr("transB", 0):
        B = B.t()
    y = float(ctx.attr("alpha", 1.0)) * (A @ B)
    if C is not None:
        y = y + float(ctx.attr("beta", 1.0)) * C
    return [y]


@register("MatMul")
def _matmul(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [torch.matmul(a[0], a[1])]


@register("Add")
def _add(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [a[0] + a[1]]


@register("Sub")
def _sub(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [a[0] - a[1]]


@register("Mul")
def _mul(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [a[0] * a[1]]


@register("Div")
def _div(ctx: NodeContext, a: list[Any]) -> list[Any]:
    if not a[0].is_floating_point() and not a[1].is_floating_point():
        return [torch.div(a[0], a[1], rounding_mode="trunc")]
    return [a[0] / a[1]]


@register("Relu")
def _relu(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [F.relu(a[0])]


@register("Clip")
def _clip(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    if ctx.opset < 11:
        lo, hi = ctx.attr("min"), ctx.attr("max")
    else:
        lo = a[1] if len(a) > 1 and a[1] is not None else None
        hi = a[2] if len(a) > 2 and a[2] is not None else None
        lo = float(lo) if lo is not None else None
        hi = float(hi) if hi is not None else None
    return [torch.clamp(x, lo, hi) if lo is not None or hi is not None else x]


@register("LeakyRelu")
def _leaky(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [F.leaky_relu(a[0], float(ctx.attr("alpha", 0.01)))]


@register("Sigmoid")
def _sigmoid(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [torch.sigmoid(a[0])]


@register("Tanh")
def _tanh(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [torch.tanh(a[0])]


def _softmax_like(ctx: NodeContext, x: torch.Tensor, fn: Any) -> torch.Tensor:
    if ctx.opset >= 13:
        return fn(x, dim=int(ctx.attr("axis", -1)))
    axis = int(ctx.attr("axis", 1)) % x.dim()  # opset < 13: coerced to 2-D at axis
    flat = x.reshape(int(math.prod(x.shape[:axis])), -1)
    return fn(flat, dim=1).reshape(x.shape)


@register("Softmax")
def _softmax(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [_softmax_like(ctx, a[0], torch.softmax)]


@register("LogSoftmax")
def _log_softmax(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [_softmax_like(ctx, a[0], torch.log_softmax)]


@register("Round")
def _round(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [torch.round(a[0])]  # half to even, like ONNX; zero gradient (not straight-through)


@register("Floor")
def _floor(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [torch.floor(a[0])]


@register("Ceil")
def _ceil(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [torch.ceil(a[0])]


@register("Identity")
def _identity(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [a[0]]


@register("Dropout")
def _dropout(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [a[0], torch.ones_like(a[0], dtype=torch.bool)]


@register("Constant")
def _constant(ctx: NodeContext, a: list[Any]) -> list[Any]:
    for key, dtype in (("value", None), ("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in ctx.attrs:
            v = ctx.attrs[key]
            return [v.clone() if dtype is None else torch.tensor(v, dtype=dtype)]
    raise ctx.fail("Constant without a supported value attribute")


@register("Cast")
def _cast(ctx: NodeContext, a: list[Any]) -> list[Any]:
    to = int(ctx.attr("to"))
    if to not in _TORCH_DTYPE:
        raise ctx.fail(f"Cast to element type {to} is not supported")
    return [a[0].to(_TORCH_DTYPE[to])]


# ---------------------------------------------------------------- shape and layout


@register("Flatten")
def _flatten(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    axis = int(ctx.attr("axis", 1)) % (x.dim() + 1)
    return [x.reshape(int(math.prod(x.shape[:axis])), -1)]


@register("Reshape")
def _reshape(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x, shape = a[0], _ints(a[1])
    if not ctx.attr("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


@register("Transpose")
def _transpose(ctx: NodeContext, a: list[Any]) -> list[Any]:
    perm = _ints(ctx.attr("perm")) or list(reversed(range(a[0].dim())))
    return [a[0].permute(perm)]


@register("Concat")
def _concat(ctx: NodeContext, a: list[Any]) -> list[Any]:
    parts = [t for t in a if t is not None]
    return [torch.cat(parts, dim=int(ctx.attr("axis")))]


def _axes(ctx: NodeContext, a: list[Any]) -> list[int]:
    if len(a) > 1 and a[1] is not None:
        return _ints(a[1])
    return _ints(ctx.attr("axes"))


@register("Squeeze")
def _squeeze(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    axes = _axes(ctx, a)
    if not axes:
        return [x.reshape([d for d in x.shape if d != 1])]
    axes = sorted(ax % x.dim() for ax in axes)
    return [x.reshape([d for i, d in enumerate(x.shape) if i not in axes])]


@register("Unsqueeze")
def _unsqueeze(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    rank = x.dim() + len(_axes(ctx, a))
    for ax in sorted(ax % rank for ax in _axes(ctx, a)):
        x = x.unsqueeze(ax)
    return [x]


@register("Shape")
def _shape(ctx: NodeContext, a: list[Any]) -> list[Any]:
    dims = list(a[0].shape)
    start, end = ctx.attr("start", 0), ctx.attr("end", None)
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


@register("Gather")
def _gather(ctx: NodeContext, a: list[Any]) -> list[Any]:
    data, idx = a[0], a[1].to(torch.int64)
    axis = int(ctx.attr("axis", 0)) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return [out.reshape(list(data.shape[:axis]) + list(idx.shape) + list(data.shape[axis + 1:]))]


@register("Slice")
def _slice(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    if ctx.opset < 10:
        starts, ends, axes, steps = _ints(ctx.attr("starts")), _ints(ctx.attr("ends")), _ints(ctx.attr("axes")), []
    else:
        starts, ends = _ints(a[1]), _ints(a[2])
        axes = _ints(a[3]) if len(a) > 3 and a[3] is not None else []
        steps = _ints(a[4]) if len(a) > 4 and a[4] is not None else []
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise ctx.fail("Slice with a non-positive step is not supported")
        size = x.shape[ax]
        s = max(0, min(size, s + size if s < 0 else s))
        e = max(0, min(size, e + size if e < 0 else e))
        index[ax % x.dim()] = slice(s, e, st)
    return [x[tuple(index)]]


@register("Pad")
def _pad(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    if ctx.opset < 11:
        pads, value = _ints(ctx.attr("pads")), float(ctx.attr("value", 0.0))
        axes: list[int] = []
    else:
        pads = _ints(a[1])
        value = float(a[2]) if len(a) > 2 and a[2] is not None and a[2].numel() else 0.0
        axes = _ints(a[3]) if len(a) > 3 and a[3] is not None else []
    axes = [ax % x.dim() for ax in axes] or list(range(x.dim()))
    full = [0] * (2 * x.dim())
    k = len(axes)
    for j, ax in enumerate(axes):
        full[ax], full[ax + x.dim()] = pads[j], pads[j + k]
    mode = ctx.attr("mode", "constant")
    torch_pads = _torch_pad(full)
    while len(torch_pads) > 2 and torch_pads[-1] == 0 and torch_pads[-2] == 0:
        torch_pads = torch_pads[:-2]  # drop leading all-zero dims (reflect/replicate need it)
    if mode == "constant":
        return [F.pad(x, torch_pads, value=value)]
    if mode in ("reflect", "edge"):
        return [F.pad(x, torch_pads, mode="reflect" if mode == "reflect" else "replicate")]
    raise ctx.fail(f"Pad mode {mode!r} is not supported")
