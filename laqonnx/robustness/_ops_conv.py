"""Torch handlers of the mirror: convolution, transposed convolution, pooling, batch norm.

ONNX pads ``[b1, .., bn, e1, .., en]`` (after ``auto_pad``) are applied by the convolution itself
when symmetric, else by an explicit ``F.pad`` first (``-inf`` for MaxPool; AveragePool without
``count_include_pad`` divides by the pooled mask of real elements).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .mirror import NodeContext, register

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
