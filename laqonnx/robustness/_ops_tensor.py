"""Torch handlers of the mirror: reductions, broadcasting and splitting, generators, LayerNorm, Einsum.

Opset-dependent forms are read from wherever the node carries them: reduction ``axes`` from the
input (ReduceSum from opset 13, the others from opset 18) or else the attribute; Split sizes from
the ``split`` input (opset 13+), the ``split`` attribute (before 13) or ``num_outputs`` (18+).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ._ops_conv import _ints
from .mirror import NodeContext, register

__all__: list[str] = []

# ---------------------------------------------------------------- reductions


def _reduce_axes(ctx: NodeContext, a: list[Any], x: torch.Tensor) -> list[int] | None:
    """The reduced axes (normalised, sorted); ``None`` for a no-op (empty axes, noop_with_empty_axes)."""
    if len(a) > 1 and a[1] is not None:
        axes = _ints(a[1])
    else:
        axes = _ints(ctx.attr("axes"))
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return None
        return list(range(x.dim()))
    return sorted({ax % x.dim() for ax in axes}) if x.dim() else []


def _prod(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=True)
    return x if keepdim else x.reshape([s for i, s in enumerate(x.shape) if i not in dims])


_REDUCERS: dict[str, Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]] = {
    "ReduceSum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


def _reduction(fn: Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]) -> Callable[..., list[Any]]:
    def handler(ctx: NodeContext, a: list[Any]) -> list[Any]:
        x = a[0]
        axes = _reduce_axes(ctx, a, x)
        if axes is None:
            return [x]
        if not axes:  # a scalar: nothing to reduce over
            return [fn(x.reshape(1), (0,), False).reshape(())]
        return [fn(x, tuple(axes), bool(ctx.attr("keepdims", 1)))]

    return handler


for _name, _fn in _REDUCERS.items():
    register(_name)(_reduction(_fn))

# ---------------------------------------------------------------- broadcasting, tiling, splitting


@register("Expand")
def _expand(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(a[1])))  # bidirectional broadcast
    return [x.expand(shape)]


@register("Tile")
def _tile(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [a[0].repeat(_ints(a[1]))]


@register("Split")
def _split(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    axis = int(ctx.attr("axis", 0)) % x.dim()
    n_out = len(ctx.node.output)
    sizes = _ints(a[1]) if len(a) > 1 and a[1] is not None else _ints(ctx.attr("split"))
    if not sizes:
        n = int(ctx.attr("num_outputs", n_out))
        chunk = math.ceil(x.shape[axis] / n)  # opset 18: the last chunk may be smaller
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    if sum(sizes) != x.shape[axis]:
        raise ctx.fail(f"split sizes {sizes} do not add up to dimension {x.shape[axis]}")
    return list(torch.split(x, sizes, dim=axis))


# ---------------------------------------------------------------- generators


@register("Range")
def _range(ctx: NodeContext, a: list[Any]) -> list[Any]:
    start, limit, delta = a[0], a[1], a[2]
    n = max(math.ceil((limit.item() - start.item()) / delta.item()), 0)
    return [start + delta * torch.arange(n, dtype=start.dtype)]


@register("ConstantOfShape")
def _constant_of_shape(ctx: NodeContext, a: list[Any]) -> list[Any]:
    value = ctx.attr("value")
    shape = _ints(a[0])
    if value is None:
        return [torch.zeros(shape, dtype=torch.float32)]
    return [torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype)]


# ---------------------------------------------------------------- normalisation, Einsum


@register("LayerNormalization")
def _layer_norm(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x, scale = a[0], a[1]
    bias = a[2] if len(a) > 2 else None
    axis = int(ctx.attr("axis", -1)) % x.dim()
    eps = float(ctx.attr("epsilon", 1e-5))
    dims = tuple(range(axis, x.dim()))
    xs = x.to(torch.float32) if int(ctx.attr("stash_type", 1)) == 1 and x.dtype != torch.float64 else x
    mean = xs.mean(dim=dims, keepdim=True)
    centred = xs - mean
    inv_std = torch.rsqrt((centred * centred).mean(dim=dims, keepdim=True) + eps)
    y = (centred * inv_std).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv_std]


@register("Einsum")
def _einsum(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [torch.einsum(str(ctx.attr("equation")).replace(" ", ""), *[t for t in a if t is not None])]
