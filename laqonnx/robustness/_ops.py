"""Torch handlers of the mirror for the float ONNX ops exported classifiers use.

Each handler gets the node's context and its evaluated inputs (``None`` for an omitted optional
input) and returns the list of its outputs. Shapes are concrete (eager evaluation), so shape
arithmetic (Shape, Gather, Concat of int64 tensors, Reshape) simply runs on small int tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .mirror import _TORCH_DTYPE, NodeContext, register

__all__: list[str] = []


def _ints(t: Any) -> list[int]:
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


# ---------------------------------------------------------------- convolution and pooling


def _spatial_pads(ctx: NodeContext, x: torch.Tensor, kernel: list[int], strides: list[int],
                  dilations: list[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] after resolving ``auto_pad``."""
    n = len(kernel)
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(n):
            size = x.shape[2 + i]
            out = math.ceil(size / strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * n)
    return _ints(ctx.attr("pads")) or [0] * (2 * n)


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] (spatial) -> torch F.pad order (last dim first)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _geometry(ctx: NodeContext, x: torch.Tensor, kernel: list[int]) -> tuple[list[int], list[int], list[int]]:
    n = len(kernel)
    strides = _ints(ctx.attr("strides")) or [1] * n
    dilations = _ints(ctx.attr("dilations")) or [1] * n
    return strides, dilations, _spatial_pads(ctx, x, kernel, strides, dilations)


@register("Conv")
def _conv(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x, w = a[0], a[1]
    b = a[2] if len(a) > 2 else None
    n = w.dim() - 2
    if n not in (1, 2, 3):
        raise ctx.fail(f"{n}-D convolution is not supported")
    kernel = list(w.shape[2:])
    strides, dilations, pads = _geometry(ctx, x, kernel)
    group = int(ctx.attr("group", 1))
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    if pads[:n] == pads[n:]:
        return [fn(x, w, b, strides, pads[:n], dilations, group)]
    return [fn(F.pad(x, _torch_pad(pads)), w, b, strides, 0, dilations, group)]


@register("ConvTranspose")
def _conv_transpose(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x, w = a[0], a[1]
    b = a[2] if len(a) > 2 else None
    n = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = _ints(ctx.attr("strides")) or [1] * n
    dilations = _ints(ctx.attr("dilations")) or [1] * n
    out_pad = _ints(ctx.attr("output_padding")) or [0] * n
    group = int(ctx.attr("group", 1))
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    full = fn(x, w, None, strides, 0, 0, group, dilations)  # no padding, no output padding
    out_shape = _ints(ctx.attr("output_shape"))
    auto = ctx.attr("auto_pad", "NOTSET")
    begins, ends = [0] * n, [0] * n
    for i in range(n):
        natural = strides[i] * (x.shape[2 + i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1
        if out_shape or auto in ("SAME_UPPER", "SAME_LOWER"):
            target = out_shape[-n + i] if out_shape else x.shape[2 + i] * strides[i]
            total = natural - target
            if auto == "SAME_UPPER":
                begins[i], ends[i] = total // 2, total - total // 2
            else:
                begins[i], ends[i] = total - total // 2, total // 2
        else:
            pads = _ints(ctx.attr("pads")) or [0] * (2 * n)
            begins[i], ends[i] = pads[i], pads[i + n]
        ends[i] -= out_pad[i]  # output padding extends the end (with zeros beyond the full result)
    # crop (positive) or zero-extend (negative) each spatial side
    y = F.pad(full, _torch_pad([-v for v in begins] + [-v for v in ends]))
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * n)
    return [y]


def _pool_args(ctx: NodeContext, x: torch.Tensor) -> tuple[list[int], list[int], list[int], list[int], bool]:
    kernel = _ints(ctx.attr("kernel_shape"))
    strides, dilations, pads = _geometry(ctx, x, kernel)
    return kernel, strides, dilations, pads, bool(ctx.attr("ceil_mode", 0))


@register("MaxPool")
def _max_pool(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        raise ctx.fail("the Indices output of MaxPool is not supported")
    kernel, strides, dilations, pads, ceil = _pool_args(ctx, x)
    n = len(kernel)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    if pads[:n] == pads[n:] and all(2 * p <= k for p, k in zip(pads[:n], kernel)):
        return [fn(x, kernel, strides, pads[:n], dilations, ceil)]
    return [fn(F.pad(x, _torch_pad(pads), value=-math.inf), kernel, strides, 0, dilations, ceil)]


@register("AveragePool")
def _avg_pool(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    kernel, strides, dilations, pads, ceil = _pool_args(ctx, x)
    if any(d != 1 for d in dilations):
        raise ctx.fail("dilated AveragePool is not supported")
    n = len(kernel)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    include = bool(ctx.attr("count_include_pad", 0))
    if not any(pads):
        return [fn(x, kernel, strides, 0, ceil, True)]
    xp = F.pad(x, _torch_pad(pads))
    if include:
        return [fn(xp, kernel, strides, 0, ceil, True)]
    mask = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads))
    return [fn(xp, kernel, strides, 0, ceil, True) / fn(mask, kernel, strides, 0, ceil, True)]


@register("GlobalAveragePool")
def _gap(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True)]


@register("GlobalMaxPool")
def _gmp(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [a[0].amax(dim=tuple(range(2, a[0].dim())), keepdim=True)]


@register("BatchNormalization")
def _batch_norm(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x, scale, bias, mean, var = a[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    eps = float(ctx.attr("epsilon", 1e-5))
    y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)
    return [y]


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


@register("ReduceMean")
def _reduce_mean(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    axes = _ints(a[1]) if ctx.opset >= 18 and len(a) > 1 and a[1] is not None else _ints(ctx.attr("axes"))
    keep = bool(ctx.attr("keepdims", 1))
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(x.dim()))
    return [x.mean(dim=tuple(axes), keepdim=keep)]
