"""Per-op operator norms: :func:`operator_norm` (the L2 norm of a layer's linear map at its input
shape: exact for small convs, 1x1 convs and matrices, Lanczos for large convs warm-started from a
circular problem, a reshaped-kernel upper bound without torch) and :func:`image_norm` (the gain on
one input vector)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .._util.threads import compute_threads
from ..errors import OptionError
from ..graph import Layer
from .maps import _circular_conv, _conv_adjoint, _conv_geometry, _conv_map, _matrix_map, _torch, window_overlap
from .solvers import OperatorNorm, _iterative_sigma, _lanczos_sigma, _top_singular, linear_map_norm

__all__ = ["operator_norm", "image_norm"]

_PERIOD_DIVISOR = 2  # a large Conv is warm-started from a circular problem on half its input side,
_MIN_PERIOD = 16  # ... but never on a coarser frequency grid than 2 pi / 16 (it locked onto a lower mode at 7)
_START_MIX = 0.1  # weight of a random component added to a warm start (keeps every mode in the Krylov space)
_START_TOL = 1e-3  # the warm start only needs the right mode, not a converged value


def _periodic_start(torch, layer: Layer, w, shape: tuple[int, ...], tol: float, seed: int):
    """A start vector for a large Conv: the top right singular vector of the same kernel as a
    *circular* convolution on a small period ``m`` (per spatial axis), tiled over the input.

    Away from the borders the zero-padded operator at the real size acts on an ``m``-periodic
    input exactly like the circular one (the output grid is aligned because the stride divides
    ``m``), so the tiled vector has nearly the top Rayleigh quotient and Lanczos at the real size
    only refines it. Returns None when no period smaller than the input fits.
    """
    _, begin, _, strides, dil, kernel, kw = _conv_geometry(layer)
    sizes = shape[2:]
    periods = []
    for n, s, k, d in zip(sizes, strides, kernel, dil):
        extent = (k - 1) * d + 1
        m = max(extent, -(-n // _PERIOD_DIVISOR), _MIN_PERIOD)
        m = -(-m // s) * s  # a multiple of the stride
        periods.append(m)
    if all(m >= n for m, n in zip(periods, sizes)):
        return None
    small = (1, shape[1], *periods)

    circular, adjoint = _circular_conv(torch, w, tuple(begin), tuple(periods), strides, dil, kw["groups"])
    _, vec, _, _ = _iterative_sigma(torch, circular, small, None, max(tol, _START_TOL), 200, seed, adjoint)
    reps = [1, *[-(-n // m) for n, m in zip(sizes, periods)]]
    tiled = np.tile(vec, reps)[(slice(None), *[slice(0, n) for n in sizes])]
    for axis, n in enumerate(sizes):
        env = np.sin(np.pi * (np.arange(n) + 1.0) / (n + 1.0)).astype(np.float32)  # lowest box mode
        tiled = tiled * env.reshape((n,) + (1,) * (len(sizes) - 1 - axis))
    r = np.random.default_rng(seed).standard_normal(tiled.shape).astype(np.float32)
    return tiled / np.linalg.norm(tiled) + _START_MIX * r / np.linalg.norm(r)


_NORMS: dict[str, Callable[..., OperatorNorm]] = {}


def _norm_for(*ops: str):
    def deco(fn):
        for op in ops:
            _NORMS[op] = fn
        return fn

    return deco


def _reshaped_bound(layer: Layer, weight: np.ndarray, why: str) -> OperatorNorm:
    a = layer.attrs
    g = int(a["group"])
    w = weight  # Conv: rows are output channels; ConvTranspose: its adjoint is a conv with C_in rows
    per = w.shape[0] // g
    sig = max(float(np.linalg.norm(w[i * per:(i + 1) * per].reshape(per, -1), 2)) for i in range(g))
    count = window_overlap(tuple(a["kernel_shape"]), tuple(a["strides"]), tuple(a["dilations"]))
    return OperatorNorm(sig * math.sqrt(count), "reshaped-bound", 0,
                        f"upper bound sigma_max(reshaped kernel) * sqrt({count} overlapping taps): {why}")


def _pointwise_norm(layer: Layer, weight: np.ndarray) -> OperatorNorm:
    """Exact norm of a 1x1 Conv: it applies the (C_out x C_in) matrix of each group to every pixel it
    reads (strides skip pixels, padded outputs are 0), so it is ``max_g sigma_max(W_g)`` at any input
    size. The top right singular vector sits on one pixel the conv reads (None if the shape is unknown)."""
    g = int(layer.attrs["group"])
    w = np.asarray(weight, dtype=np.float64).reshape(weight.shape[0], -1)  # (C_out, C_in / g)
    per = w.shape[0] // g
    best, best_g, best_v = -1.0, 0, None
    for i in range(g):
        sigma, v = _top_singular(w[i * per:(i + 1) * per].T)  # the block maps x -> W_g x
        if sigma > best:
            best, best_g, best_v = sigma, i, v
    vector = None
    shape = layer.input_shape
    if shape is not None and all(int(n) > 0 for n in shape[2:]):
        nd = len(shape) - 2
        pixel = []
        for n, s, b in zip(shape[2:], layer.attrs["strides"], layer.attrs["pads"][:nd]):
            first = -(-b // s) * s - b  # the input index read by the first output past the padding
            if first >= int(n):
                return OperatorNorm(0.0, "spectral", 0, "the 1x1 conv reads only padding", None)
            pixel.append(first)
        cin_g = w.shape[1]
        vec = np.zeros(tuple(int(d) for d in shape[1:]), dtype=np.float32)
        vec[(slice(best_g * cin_g, (best_g + 1) * cin_g), *pixel)] = best_v
        vector = vec
    return OperatorNorm(best, "spectral", 0, "", vector)


@_norm_for("Conv", "ConvTranspose")
def _conv_norm(layer: Layer, weight: np.ndarray, tol: float, max_iter: int, seed: int, init) -> OperatorNorm:
    if layer.op_type == "Conv" and all(int(k) == 1 for k in layer.attrs["kernel_shape"]) and layer.attrs.get("pads") is not None:
        return _pointwise_norm(layer, weight)
    torch = _torch()
    if torch is None:
        return _reshaped_bound(layer, weight, "torch is not installed (pip install 'laqonnx[robustness]')")
    if layer.input_shape is None or layer.attrs.get("pads") is None:
        return _reshaped_bound(layer, weight, "the layer's input shape is unknown")
    shape = (1, *layer.input_shape[1:])

    def build(dtype):
        return _conv_map(torch, layer, torch.tensor(np.asarray(weight), dtype=dtype))

    def build_adjoint(dtype):
        return _conv_adjoint(torch, layer, torch.tensor(np.asarray(weight), dtype=dtype))

    try:
        with torch.no_grad(), compute_threads():
            start = None
            if layer.op_type == "Conv":
                start = lambda: _periodic_start(torch, layer, torch.tensor(np.asarray(weight)), shape, tol, seed)  # noqa: E731
            return linear_map_norm(build, shape, tol=tol, max_iter=max_iter, seed=seed, init=init, adjoint_builder=build_adjoint,
                                   start=start)
    except RuntimeError as exc:  # e.g. a geometry torch does not support
        return _reshaped_bound(layer, weight, f"torch could not apply the operator ({type(exc).__name__}: {str(exc)[:120]})")


@_norm_for("Gemm", "MatMul")
def _matrix_norm(layer: Layer, weight: np.ndarray, tol: float, max_iter: int, seed: int, init) -> OperatorNorm:
    m, scale = _matrix_map(layer, weight)
    if min(m.shape) <= 1024 or m.size <= 4_000_000:  # a dense eigen-solve of at most 1024^2 (or a small matrix)
        sigma, u = _top_singular(m)
        return OperatorNorm(scale * sigma, "spectral", 0, "", u.astype(np.float32))
    torch = _torch()
    if torch is None:
        return OperatorNorm(scale * float(np.linalg.norm(m, 2)), "spectral", 0, "", None)
    mt = torch.from_numpy(m.astype(np.float32))
    v0 = init if init is not None and np.size(init) == m.shape[0] else np.random.default_rng(seed).standard_normal(m.shape[0])
    with torch.no_grad():
        sigma, vec, its, note = _lanczos_sigma(torch, lambda v: mt @ (mt.T @ v), torch.tensor(np.ravel(v0)), tol, max_iter)
    return OperatorNorm(scale * sigma, "lanczos", its, note, vec.numpy())


def operator_norm(
    layer: Layer,
    weight: np.ndarray,
    *,
    tol: float = 1e-4,
    max_iter: int = 500,
    seed: int = 0,
    init: np.ndarray | None = None,
) -> OperatorNorm:
    """The L2 operator norm of ``layer``'s linear map with weight ``weight`` (float or quantized)."""
    if tol <= 0 or max_iter < 1:
        raise OptionError("tol must be > 0 and max_iter >= 1")
    fn = _NORMS.get(layer.op_type)
    if fn is None:
        raise ValueError(f"no operator-norm rule for op type {layer.op_type!r}")
    if tuple(np.shape(weight)) != tuple(layer.weight_shape):
        raise ValueError(f"weight shape {np.shape(weight)} does not match layer {layer.name} {layer.weight_shape}")
    return fn(layer, np.asarray(weight, dtype=np.float32), tol, max_iter, seed, init)


def image_norm(layer: Layer, weight: np.ndarray, vector: np.ndarray) -> float:
    """``||T v|| / ||v||``: the gain of ``layer``'s linear map with weight ``weight`` on one input
    ``vector`` (shape of one input sample, e.g. :attr:`OperatorNorm.vector`). One application of
    the map, in float64: a Rayleigh-quotient lower bound on the operator norm."""
    if tuple(np.shape(weight)) != tuple(layer.weight_shape):
        raise ValueError(f"weight shape {np.shape(weight)} does not match layer {layer.name} {layer.weight_shape}")
    v = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if norm == 0 or not math.isfinite(norm):
        raise ValueError("vector must be finite and nonzero")
    if layer.op_type in ("Gemm", "MatMul"):
        m, scale = _matrix_map(layer, weight)
        if v.size != m.shape[0]:
            raise ValueError(f"vector has {v.size} elements, layer {layer.name} takes {m.shape[0]}")
        return scale * float(np.linalg.norm(m.T @ v.ravel())) / norm
    w = np.asarray(weight, dtype=np.float64)
    if layer.op_type not in ("Conv", "ConvTranspose") or layer.input_shape is None:
        raise ValueError(f"image_norm needs a Conv/ConvTranspose with a known input shape or a Gemm/MatMul ({layer.name})")
    torch = _torch()
    if torch is None:
        raise ValueError("image_norm of a conv needs torch (pip install 'laqonnx[robustness]')")
    shape = (1, *layer.input_shape[1:])
    if v.size != int(np.prod(shape)):
        raise ValueError(f"vector has {v.size} elements, layer {layer.name} takes {shape[1:]}")
    with torch.no_grad(), compute_threads():
        y = _conv_map(torch, layer, torch.from_numpy(w))(torch.from_numpy(v.reshape(shape)))
    return float(y.norm()) / norm
