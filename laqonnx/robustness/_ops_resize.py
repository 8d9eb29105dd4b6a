"""Torch handler of the mirror for Resize (opsets 10-19) and Upsample (opsets 7-9).

Resizing is separable: each resized axis maps every output index to a source coordinate
(``coordinate_transformation_mode``, computed in float32 as onnxruntime does), then gathers one
(nearest), two (linear) or four (cubic) source rows along that axis and blends them with weights.
Differentiable in the data (gathers and weighted sums); the indices carry no gradient.

Before opset 11 (Resize-10, Upsample) the transform is ``asymmetric`` and nearest rounds as
onnxruntime's legacy mode does (truncate when upsampling, ceil when downsampling).
``tf_crop_and_resize`` and antialiased downsampling are refused with a ModelError.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ._ops_conv import _ints
from .mirror import NodeContext, register

__all__: list[str] = []

_F32 = torch.float32


def _source_coords(mode: str, out_len: int, in_len: int, scale: float) -> torch.Tensor:
    """Source coordinate of each output index along one axis (float32, unclamped)."""
    x = torch.arange(out_len, dtype=_F32)
    s = torch.tensor(scale, dtype=_F32)
    if mode == "asymmetric":
        return x / s
    if mode == "half_pixel":
        return (x + 0.5) / s - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / s - 0.5 if out_len > 1 else torch.zeros_like(x)
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / s
    if mode == "align_corners":
        if out_len == 1:
            return torch.zeros_like(x)
        return x * torch.tensor(in_len - 1, dtype=_F32) / torch.tensor(out_len - 1, dtype=_F32)
    if mode == "half_pixel_symmetric":
        adjustment = torch.tensor(out_len, dtype=_F32) / (s * in_len)
        offset = torch.tensor(in_len / 2, dtype=_F32) * (1 - adjustment)
        return offset + (x + 0.5) / s - 0.5
    raise ValueError(mode)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)  # C's std::round


def _nearest_index(mode: str, src: torch.Tensor, downsampling: bool) -> torch.Tensor:
    if mode == "floor":
        idx = torch.floor(src)
    elif mode == "ceil":
        idx = torch.ceil(src)
    elif mode == "round_prefer_ceil":
        idx = _round_half_away(src)
    elif mode == "round_prefer_floor":
        idx = torch.where(src == torch.trunc(src) + 0.5, torch.floor(src), _round_half_away(src))
    else:  # "simple": onnxruntime's rounding before nearest_mode existed
        idx = torch.ceil(src) if downsampling else torch.trunc(src)
    return idx.to(torch.int64)


def _cubic_taps(src: torch.Tensor, in_len: int, a: float, exclude_outside: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    base = torch.floor(src)
    t = src - base
    dists = [t + 1, t, 1 - t, 2 - t]
    coeffs = []
    for d in dists:  # Keys' cubic convolution kernel with parameter a
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        coeffs.append(torch.where(d <= 1, near, far))
    idx = [base.to(torch.int64) + k for k in (-1, 0, 1, 2)]
    if exclude_outside:
        coeffs = [torch.where((i >= 0) & (i < in_len), c, torch.zeros_like(c)) for i, c in zip(idx, coeffs)]
        total = coeffs[0] + coeffs[1] + coeffs[2] + coeffs[3]
        coeffs = [c / total for c in coeffs]
    return [(i.clamp(0, in_len - 1), c) for i, c in zip(idx, coeffs)]


def _resize_axis(x: torch.Tensor, axis: int, out_len: int, scale: float, ctx: NodeContext, legacy: bool) -> torch.Tensor:
    in_len = x.shape[axis]
    mode = ctx.attr("mode", "nearest")
    coord = "asymmetric" if legacy else ctx.attr("coordinate_transformation_mode", "half_pixel")
    src = _source_coords(coord, out_len, in_len, scale)
    view = [1] * x.dim()
    view[axis] = out_len
    if mode == "nearest":
        rounding = "simple" if legacy else ctx.attr("nearest_mode", "round_prefer_floor")
        idx = _nearest_index(rounding, src, scale < 1).clamp(0, in_len - 1)
        return torch.index_select(x, axis, idx)
    if mode == "linear":
        src = src.clamp(0, in_len - 1)
        lo = torch.floor(src).to(torch.int64)
        hi = (lo + 1).clamp(max=in_len - 1)
        w = (src - lo.to(_F32)).to(x.dtype).reshape(view)
        return torch.index_select(x, axis, lo) * (1 - w) + torch.index_select(x, axis, hi) * w
    if mode == "cubic":
        taps = _cubic_taps(src, in_len, float(ctx.attr("cubic_coeff_a", -0.75)), bool(ctx.attr("exclude_outside", 0)))
        out = None
        for idx, c in taps:
            term = torch.index_select(x, axis, idx) * c.to(x.dtype).reshape(view)
            out = term if out is None else out + term
        return out
    raise ctx.fail(f"Resize mode {mode!r} is not supported")


def _plan(ctx: NodeContext, x: torch.Tensor, scales: list[float], sizes: list[int],
          axes: list[int]) -> list[tuple[int, int, float]]:
    """(axis, output length, scale) of every axis to resize."""
    shape = list(x.shape)
    if sizes:
        policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
        ratios = [np.float32(s) / np.float32(shape[ax]) for s, ax in zip(sizes, axes)]
        if policy == "stretch":
            return [(ax, s, float(r)) for ax, s, r in zip(axes, sizes, ratios)]
        if policy not in ("not_larger", "not_smaller"):
            raise ctx.fail(f"keep_aspect_ratio_policy {policy!r} is not supported")
        r = min(ratios) if policy == "not_larger" else max(ratios)
        return [(ax, int(_round_half_away(torch.tensor(float(r) * shape[ax])).item()), float(r)) for ax in axes]
    if len(scales) != len(axes):
        raise ctx.fail(f"Resize has {len(scales)} scales for {len(axes)} axes")
    return [(ax, int(np.float32(s) * np.float32(shape[ax])), float(np.float32(s))) for ax, s in zip(axes, scales)]


def _floats(t: Any) -> list[float]:
    if t is None:
        return []
    return [float(v) for v in t.reshape(-1).tolist()] if isinstance(t, torch.Tensor) else [float(v) for v in t]


def _apply(ctx: NodeContext, x: torch.Tensor, plan: list[tuple[int, int, float]], legacy: bool) -> torch.Tensor:
    mode = ctx.attr("mode", "nearest")
    if ctx.attr("coordinate_transformation_mode") == "tf_crop_and_resize":
        raise ctx.fail("Resize with coordinate_transformation_mode 'tf_crop_and_resize' is not supported")
    if int(ctx.attr("antialias", 0)) and mode != "nearest" and any(s < 1 for _, _, s in plan):
        raise ctx.fail("antialiased downsampling (antialias=1) is not supported")
    for axis, out_len, scale in plan:
        if out_len != x.shape[axis] or not math.isclose(scale, 1.0):
            x = _resize_axis(x, axis, out_len, scale, ctx, legacy)
    return x


@register("Resize")
def _resize(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    if ctx.opset < 11:
        scales, sizes = _floats(a[1]), []
    else:
        scales = _floats(a[2]) if len(a) > 2 else []
        sizes = _ints(a[3]) if len(a) > 3 else []
    axes = [ax % x.dim() for ax in _ints(ctx.attr("axes"))] or list(range(x.dim()))
    return [_apply(ctx, x, _plan(ctx, x, scales, sizes, axes), legacy=ctx.opset < 11)]


@register("Upsample")
def _upsample(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    scales = _floats(a[1]) if len(a) > 1 and a[1] is not None else _floats(ctx.attr("scales"))
    return [_apply(ctx, x, _plan(ctx, x, scales, [], list(range(x.dim()))), legacy=True)]
