"""The linear maps of weighted layers, as torch functions: a Conv/ConvTranspose at its real input
shape with its stride, padding, dilation and groups (:func:`_conv_map`), its explicit adjoint
(:func:`_conv_adjoint`), the same kernel as a circular convolution (:func:`_circular_conv`), and
a Gemm/MatMul as a matrix (:func:`_matrix_map`). torch is imported lazily (:func:`_torch`)."""

from __future__ import annotations

import numpy as np

from ..graph import Layer

__all__ = ["window_overlap"]


def window_overlap(kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...]) -> int:
    """The most windows (or kernel taps) any single input element belongs to."""
    total = 1
    for k, s, d in zip(kernel, strides, dilations):
        counts = [0] * s
        for j in range(k):
            counts[(j * d) % s] += 1
        total *= max(counts)
    return total


def _torch():
    try:
        import torch

        return torch
    except ImportError:
        return None


def _conv_geometry(layer: Layer):
    """A Conv/ConvTranspose's spatial rank, pads (begin, end), strides, dilations, kernel and the
    torch keyword arguments (stride, dilation, groups)."""
    a = layer.attrs
    nd = len(layer.weight_shape) - 2
    begin, end = list(a["pads"][:nd]), list(a["pads"][nd:])
    strides, dil, kernel = tuple(a["strides"]), tuple(a["dilations"]), tuple(a["kernel_shape"])
    return nd, begin, end, strides, dil, kernel, dict(stride=strides, dilation=dil, groups=int(a["group"]))


def _transposed_extent(layer: Layer) -> tuple[list[int], list[int]]:
    """A ConvTranspose's full (unpadded) output size per axis, and where its cropped output stops
    (``output_padding`` adds zeros only)."""
    nd, _, end, strides, dil, kernel, _ = _conv_geometry(layer)
    out_pad = layer.attrs.get("output_padding", (0,) * nd)
    full = [s * (n - 1) + (k - 1) * d + 1 for n, s, k, d in zip(layer.input_shape[2:], strides, kernel, dil)]
    return full, [min(f, f + op - e) for f, op, e in zip(full, out_pad, end)]


def _conv_map(torch, layer: Layer, w):
    """x (1, C, *spatial) -> the layer's linear part, as a torch function."""
    F = torch.nn.functional
    nd, begin, end, _, _, _, kw = _conv_geometry(layer)
    if layer.op_type == "Conv":
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        if begin == end:
            return lambda x: conv(x, w, padding=tuple(begin), **kw)
        flat = [p for i in reversed(range(nd)) for p in (begin[i], end[i])]
        return lambda x: conv(F.pad(x, flat), w, **kw)
    convt = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    _, stops = _transposed_extent(layer)
    index = (slice(None), slice(None), *[slice(b, s) for b, s in zip(begin, stops)])
    return lambda x: convt(x, w, **kw)[index]


def _conv_adjoint(torch, layer: Layer, w):
    """The adjoint of :func:`_conv_map` (explicit, cheaper than autograd)."""
    F = torch.nn.functional
    nd, begin, end, strides, dil, kernel, kw = _conv_geometry(layer)
    in_sp = layer.input_shape[2:]
    if layer.op_type == "Conv":  # conv(pad(x)) -> crop(conv_transpose(y))
        convt = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        padded = [n + b + e for n, b, e in zip(in_sp, begin, end)]
        outs = [(p - (k - 1) * d - 1) // s + 1 for p, k, d, s in zip(padded, kernel, dil, strides)]
        extra = tuple(p - ((o - 1) * s + (k - 1) * d + 1) for p, o, s, k, d in zip(padded, outs, strides, kernel, dil))
        index = (slice(None), slice(None), *[slice(b, b + n) for b, n in zip(begin, in_sp)])
        return lambda y: convt(y, w, output_padding=extra, **kw)[index]
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]  # crop(conv_transpose(x)) -> conv(zero-extend(z))
    full, stops = _transposed_extent(layer)
    widths = [s - b for s, b in zip(stops, begin)]
    flat = [p for i in reversed(range(nd)) for p in (begin[i], full[i] - stops[i])]

    def adjoint(z):
        z = z[(slice(None), slice(None), *[slice(0, wd) for wd in widths])]  # drop output_padding zeros
        return conv(F.pad(z, flat), w, **kw)

    return adjoint


def _circular_conv(torch, w, shifts: tuple[int, ...], periods: tuple[int, ...], strides, dil, groups: int):
    """The conv with kernel ``w`` as a circular convolution on period ``periods`` (each a multiple of
    its stride and at least the kernel extent), and its explicit adjoint (cheaper than autograd):
    ``y[o] = sum_k w[k] x[(o s + k d - shift) mod m]``."""
    F = torch.nn.functional
    nd = len(periods)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    convt = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    kw = {"stride": tuple(strides), "dilation": tuple(dil), "groups": groups}
    right = [(k - 1) * d for k, d in zip(w.shape[2:], dil)]  # the wrap-around each axis needs
    dims = tuple(range(2, 2 + nd))
    keep = (slice(None), slice(None), *[slice(0, m + r) for m, r in zip(periods, right)])

    def forward(x):
        x = torch.roll(x, shifts=shifts, dims=dims)
        if any(right):
            x = x.repeat(1, 1, *[1 + -(-r // m) for r, m in zip(right, periods)])[keep]
        return conv(x, w, **kw)

    def adjoint(y):  # conv_transpose back to the extended input, fold the wrapped part, roll back
        z = convt(y, w, output_padding=tuple(s - 1 for s in strides), **kw)
        for axis, (m, r) in enumerate(zip(periods, right)):
            if r:
                dim = 2 + axis
                head, tail = z.narrow(dim, 0, m).clone(), z.narrow(dim, m, r)
                head.narrow(dim, 0, r).add_(tail)
                z = head
        return torch.roll(z, shifts=tuple(-s for s in shifts), dims=dims)

    return forward, adjoint


def _matrix_map(layer: Layer, weight: np.ndarray) -> tuple[np.ndarray, float]:
    """A Gemm/MatMul layer as ``x -> scale * m^T x`` on one input row/column: ``m`` (n_in, n_out), float64."""
    w = np.asarray(weight, dtype=np.float64)
    if layer.op_type == "Gemm":
        m = w.T if layer.attrs.get("transB", 0) else w
    else:
        m = w if layer.attrs.get("weight_input", 1) == 1 else w.T
    return m, abs(float(layer.attrs.get("alpha", 1.0)))
