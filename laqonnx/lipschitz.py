"""Lipschitz stage: operator norms of weighted layers, and whole-network bounds over the graph.

:func:`operator_norm` is the L2 operator norm of a layer's linear map at its input shape
(Conv/ConvTranspose: the true convolution operator with its stride, padding, dilation and groups;
Gemm/MatMul: the spectral norm of the matrix). :func:`network_bounds` propagates bounds over the
DAG with per-op rules registered in :data:`RULES` with :func:`register_rule`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import onnx

from ._util.threads import compute_threads
from .graph import Layer, PreparedModel

__all__ = [
    "OperatorNorm",
    "operator_norm",
    "image_norm",
    "NetworkBounds",
    "network_bounds",
    "NoRule",
    "RULES",
    "register_rule",
    "window_overlap",
    "EXPLICIT_MAX_INPUT",
]

EXPLICIT_MAX_INPUT = 4096  # conv operators with at most this many input elements get an exact SVD
_EXPLICIT_MAX_SIDE = 256  # ... provided the smaller side of the explicit matrix is at most this. At 1024 the
# float64 eigen-solve took 53 ms per call and dominated quantize on small models (7 norms per layer):
# on the 20 digits zoo models 256 gave the same chosen settings on all 202 layers (int8 and mixed)
# and cut quantize from 1.1 / 4.1 s to 0.3 / 0.5 s (cnn / resnet).
_PERIOD_DIVISOR = 2  # a large Conv is warm-started from a circular problem on half its input side,
_MIN_PERIOD = 16  # ... but never on a coarser frequency grid than 2 pi / 16 (it locked onto a lower mode at 7)
_MIN_STALL_STEPS = 8  # Lanczos may stop on stagnation only after this many steps in a restart cycle
_START_MIX = 0.1  # weight of a random component added to a warm start (keeps every mode in the Krylov space)
_START_TOL = 1e-3  # the warm start only needs the right mode, not a converged value


@dataclass(frozen=True)
class OperatorNorm:
    """An operator norm and how it was obtained.

    ``method``: "svd" (exact, explicit conv matrix), "spectral" (exact, weight matrix),
    "lanczos" (Lanczos/ARPACK on the normal operator, a lower bound converged to ``tol``),
    "reshaped-bound" (an upper bound from the reshaped kernel; ``note`` says why).
    ``vector`` is the top right singular vector (input space, shape of one input sample), usable
    as ``init`` to warm-start the same operator with perturbed weights.
    """

    value: float
    method: str
    iterations: int
    note: str = ""
    vector: np.ndarray | None = field(default=None, compare=False, repr=False)


def window_overlap(kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...]) -> int:
    """The most windows (or kernel taps) any single input element belongs to."""
    total = 1
    for k, s, d in zip(kernel, strides, dilations):
        counts = [0] * s
        for j in range(k):
            counts[(j * d) % s] += 1
        total *= max(counts)
    return total


# ---------------------------------------------------------------- the linear maps, in torch


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


def _explicit_sigma(torch, fn, shape: tuple[int, ...]):
    n_in = int(np.prod(shape[1:]))
    with torch.no_grad():
        eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *shape[1:])
        m = fn(eye).reshape(n_in, -1)  # row i = A e_i, so m = A^T
    vals, vecs = torch.linalg.eigh(m @ m.T) if m.shape[0] <= m.shape[1] else (None, None)
    if vals is not None:
        v = vecs[:, -1]
        sigma = float(vals[-1].clamp_min(0).sqrt())
    else:
        vals, vecs = torch.linalg.eigh(m.T @ m)
        sigma = float(vals[-1].clamp_min(0).sqrt())
        v = m @ vecs[:, -1]
        v = v / v.norm().clamp_min(1e-300)
    return sigma, v.numpy().astype(np.float32).reshape(shape[1:])


def _lanczos_sigma(torch, normal, v0, tol: float, max_iter: int, restart: int | None = None):
    """Largest eigenvalue of the PSD operator ``normal`` (= A^T A) by Lanczos, returned as sigma.

    Full reorthogonalization, explicit restart from the Ritz vector every ``restart`` steps. Stops
    when the residual bound ``||A^T A y - theta y|| <= tol * theta`` holds, or when sigma grew by
    less than ``tol / 10`` (relative) on each of the last two steps within one restart cycle. The Ritz value never exceeds
    the true eigenvalue, so the result is a lower bound on the operator norm.
    """
    q = v0.reshape(-1).to(torch.float32)
    q = q / q.norm()
    if restart is None:  # keep the Krylov basis under ~256 MB
        restart = int(min(64, max(8, (1 << 26) // max(1, q.numel()))))
    total, sigma, note = 0, 0.0, ""
    store = torch.empty((restart, q.numel()), dtype=q.dtype)  # the Krylov basis, filled row by row
    while True:
        alphas, betas, history = [], [], []
        prev, beta = torch.zeros_like(q), 0.0
        for k in range(restart):
            store[k] = q
            w = normal(q)
            total += 1
            alpha = float(w @ q)
            alphas.append(alpha)
            w = w - alpha * q - beta * prev
            qs = store[:k + 1]
            w = w - qs.T @ (qs @ w)
            w = w - qs.T @ (qs @ w)
            beta = float(w.norm())
            t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
            vals, vecs = np.linalg.eigh(t)
            theta = max(float(vals[-1]), 0.0)
            sigma = math.sqrt(theta)
            history.append(sigma)
            y = torch.from_numpy(vecs[:, -1].astype(np.float32))
            done = beta * abs(vecs[-1, -1]) <= tol * theta or beta <= 1e-12 * max(theta, 1e-30)
            if len(history) >= _MIN_STALL_STEPS and all(history[-i] - history[-i - 1] <= 0.1 * tol * sigma for i in (1, 2)):
                done = True
            if done or total >= max_iter:
                ritz = y @ qs
                if not done:
                    note = f"Lanczos stopped at max_iter={max_iter} before reaching tol={tol:g}"
                return sigma, ritz / ritz.norm(), total, note
            betas.append(beta)
            prev, q = q, w / beta
        q = y @ store
        q = q / q.norm()


def _iterative_sigma(torch, fn, shape: tuple[int, ...], init, tol, max_iter, seed, adjoint=None):
    n = int(np.prod(shape[1:]))
    if init is not None and np.size(init) == n and np.linalg.norm(init) > 0:
        v0 = torch.tensor(np.asarray(init, dtype=np.float32).ravel())
    else:
        v0 = torch.from_numpy(np.random.default_rng(seed).standard_normal(n).astype(np.float32))

    def normal(v):
        if adjoint is not None:
            with torch.no_grad():
                return adjoint(fn(v.reshape(shape))).reshape(-1)
        x = v.reshape(shape).detach().requires_grad_(True)
        with torch.enable_grad():
            y = fn(x)
            (g,) = torch.autograd.grad(y, x, grad_outputs=y)
        return g.reshape(-1)

    sigma, vec, its, note = _lanczos_sigma(torch, normal, v0, tol, max_iter)
    return sigma, vec.numpy().reshape(shape[1:]), its, note


def linear_map_norm(fn_builder, shape: tuple[int, ...], *, tol: float, max_iter: int, seed: int, init, adjoint_builder=None,
                    start=None):
    """Norm of the torch linear map ``fn_builder(dtype)`` at input ``shape``: exact if small.

    ``adjoint_builder(dtype)``, if given, builds the adjoint map (else autograd provides it).
    ``start()``, if given, returns a start vector (or None) for the iterative case when ``init`` is None.
    """
    torch = _torch()
    n_in = int(np.prod(shape[1:]))
    with torch.no_grad():
        n_out = int(np.prod(fn_builder(torch.float32)(torch.zeros(shape)).shape[1:]))
    if n_in <= EXPLICIT_MAX_INPUT and min(n_in, n_out) <= _EXPLICIT_MAX_SIDE:
        sigma, vec = _explicit_sigma(torch, fn_builder(torch.float64), shape)
        return OperatorNorm(sigma, "svd", 0, "", vec)
    adjoint = adjoint_builder(torch.float32) if adjoint_builder is not None else None
    if init is None and start is not None:
        init = start()
    sigma, vec, its, note = _iterative_sigma(torch, fn_builder(torch.float32), shape, init, tol, max_iter, seed, adjoint)
    return OperatorNorm(sigma, "lanczos", its, note, vec)


# ---------------------------------------------------------------- per-op operator norms

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


def _top_singular(m: np.ndarray) -> tuple[float, np.ndarray]:
    """Largest singular value of the map ``x -> m^T x`` and its top input vector (unit, length ``m.shape[0]``)."""
    if min(m.shape) <= 64:
        u, s, _ = np.linalg.svd(m, full_matrices=False)
        return float(s[0]), u[:, 0]
    # top eigenpair of the smaller Gram matrix (float64): ~4x cheaper than a full SVD of m
    if m.shape[0] <= m.shape[1]:
        vals, vecs = np.linalg.eigh(m @ m.T)
        u = vecs[:, -1]
    else:
        vals, vecs = np.linalg.eigh(m.T @ m)
        u = m @ vecs[:, -1]
        u = u / max(float(np.linalg.norm(u)), 1e-300)
    return math.sqrt(max(float(vals[-1]), 0.0)), u


def _matrix_map(layer: Layer, weight: np.ndarray) -> tuple[np.ndarray, float]:
    """A Gemm/MatMul layer as ``x -> scale * m^T x`` on one input row/column: ``m`` (n_in, n_out), float64."""
    w = np.asarray(weight, dtype=np.float64)
    if layer.op_type == "Gemm":
        m = w.T if layer.attrs.get("transB", 0) else w
    else:
        m = w if layer.attrs.get("weight_input", 1) == 1 else w.T
    return m, abs(float(layer.attrs.get("alpha", 1.0)))


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
        raise ValueError("tol must be > 0 and max_iter >= 1")
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


# ---------------------------------------------------------------- whole-network bounds


@dataclass(frozen=True)
class NoRule:
    """Returned by a rule that cannot bound its node (a value, not an exception)."""

    reason: str


@dataclass(frozen=True)
class NetworkBounds:
    network_bound: float | None
    unknown_ops: tuple[str, ...]
    gains: Mapping[str, float | None]
    upstream: Mapping[str, float | None]


@dataclass(frozen=True)
class RuleContext:
    """What a rule may look at: constants, batch-1 shapes, the layer norms."""

    pm: PreparedModel
    layer_norms: Mapping[str, float]
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        try:
            return self.pm.initializer(name)
        except KeyError:
            return None

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.pm.shapes.get(name)


Rule = Callable[[onnx.NodeProto, list, RuleContext], "float | NoRule"]
RULES: dict[str, Rule] = {}


def register_rule(*ops: str):
    """Register ``rule(node, in_bounds, ctx) -> float | NoRule`` for op types ``ops`` (default domain).

    ``in_bounds[i]`` is the bound carried by input i (0.0 for constants and tensors not downstream
    of the perturbation); the result bounds every output of the node.
    """

    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _constant_rule(value: float) -> Rule:
    return lambda node, L, ctx: value * max(L[:1] or [0.0])


register_rule("Relu", "Clip", "Tanh", "Dropout", "Identity", "Reshape", "Flatten", "Transpose", "Squeeze",
              "Unsqueeze", "Softmax", "Abs", "Neg", "Softplus", "Softsign", "Slice", "Split", "Cast",
              "GlobalMaxPool", "DepthToSpace", "SpaceToDepth", "ReduceMax", "ReduceMin", "Sin", "Cos")(_constant_rule(1.0))
register_rule("Sigmoid")(_constant_rule(0.25))
register_rule("Shape", "Size", "Constant", "ConstantOfShape", "ArgMax", "ArgMin", "Sign", "Floor", "Ceil",
              "Round", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual")(lambda node, L, ctx: 0.0)
register_rule("LeakyRelu")(lambda node, L, ctx: max(1.0, abs(_attr(node, "alpha", 0.01))) * L[0])
register_rule("Elu", "Celu")(lambda node, L, ctx: max(1.0, abs(_attr(node, "alpha", 1.0))) * L[0])
register_rule("Selu")(lambda node, L, ctx: abs(_attr(node, "gamma", 1.0507)) * max(1.0, abs(_attr(node, "alpha", 1.6733))) * L[0])
register_rule("HardSigmoid")(lambda node, L, ctx: abs(_attr(node, "alpha", 0.2)) * L[0])
register_rule("HardSwish")(lambda node, L, ctx: 1.5 * L[0])
register_rule("Add", "Sub", "Sum")(lambda node, L, ctx: sum(L))
register_rule("Mean")(lambda node, L, ctx: sum(L) / max(1, len(L)))
register_rule("Concat", "Max", "Min")(lambda node, L, ctx: math.sqrt(sum(x * x for x in L)))


@register_rule("Mul", "Div")
def _mul_div(node, L, ctx):
    if L[0] != 0.0 and L[1] != 0.0:
        return NoRule(f"{node.op_type} of two perturbed tensors")
    act = 0 if L[0] != 0.0 else 1
    if node.op_type == "Div" and act == 1:
        return NoRule("Div with a perturbed divisor")
    c = ctx.const(node.input[1 - act])
    if c is None:
        return NoRule(f"{node.op_type} by a non-constant tensor")
    c = np.abs(c.astype(np.float64))
    if node.op_type == "Div":
        if np.any(c == 0):
            return NoRule("Div by a constant containing 0")
        c = 1.0 / c
    return float(c.max(initial=0.0)) * L[act]


@register_rule("BatchNormalization")
def _batchnorm(node, L, ctx):
    params = [ctx.const(n) for n in node.input[1:5]]
    if any(p is None for p in params) or any(L[1:]):
        return NoRule("BatchNormalization with non-constant parameters")
    gamma, _, _, var = (p.astype(np.float64) for p in params)
    return float(np.max(np.abs(gamma / np.sqrt(var + _attr(node, "epsilon", 1e-5))))) * L[0]


def _size(shape) -> int | None:
    return None if shape is None else int(np.prod(shape))


@register_rule("GlobalAveragePool", "ReduceMean")
def _mean_pool(node, L, ctx):
    n_in, n_out = _size(ctx.shape(node.input[0])), _size(ctx.shape(node.output[0]))
    return L[0] * (math.sqrt(n_out / n_in) if n_in and n_out else 1.0)  # mean of n values: 1/sqrt(n)


@register_rule("Expand", "Tile")
def _broadcast(node, L, ctx):
    n_in, n_out = _size(ctx.shape(node.input[0])), _size(ctx.shape(node.output[0]))
    if not n_in or not n_out:
        return NoRule("output shape unknown")
    return L[0] * math.sqrt(max(1.0, n_out / n_in))


@register_rule("Gather")
def _gather(node, L, ctx):
    idx = ctx.const(node.input[1])
    if idx is None or L[1]:
        return NoRule("Gather with non-constant indices")
    shape = ctx.shape(node.input[0])
    axis = _attr(node, "axis", 0)
    flat = idx.astype(np.int64).ravel()
    if shape is not None:
        flat = np.where(flat < 0, flat + shape[axis], flat)
    repeats = int(np.bincount(flat - flat.min()).max()) if flat.size else 1
    return L[0] * math.sqrt(repeats)


@register_rule("Pad")
def _pad(node, L, ctx):
    mode = _attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if any(L[1:]):
        return NoRule("Pad with a perturbed pad value")
    if mode == "constant":
        return L[0]
    pads = ctx.const(node.input[1]) if len(node.input) > 1 else np.array(_attr(node, "pads", []))
    if pads is None:
        return NoRule("Pad with non-constant pads")
    pads = np.asarray(pads, dtype=np.int64)
    half = len(pads) // 2
    if mode == "reflect":  # each element: itself plus at most one copy per padded side
        factor = np.prod([1 + (pads[i] > 0) + (pads[i + half] > 0) for i in range(half)])
    else:  # edge: a border element is copied pad times
        factor = np.prod([1 + pads[i] + pads[i + half] for i in range(half)])
    return L[0] * math.sqrt(float(factor))


def _pool_geometry(node, ctx):
    kernel = tuple(_attr(node, "kernel_shape"))
    nd = len(kernel)
    strides = tuple(_attr(node, "strides", [1] * nd))
    dil = tuple(_attr(node, "dilations", [1] * nd))
    return kernel, strides, dil


@register_rule("MaxPool")
def _maxpool(node, L, ctx):
    kernel, strides, dil = _pool_geometry(node, ctx)
    return L[0] * math.sqrt(window_overlap(kernel, strides, dil))


@register_rule("AveragePool")
def _avgpool(node, L, ctx):
    kernel, strides, dil = _pool_geometry(node, ctx)
    nd = len(kernel)
    k = int(np.prod(kernel))
    shape = ctx.shape(node.input[0])
    torch = _torch()
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    include_pad = bool(_attr(node, "count_include_pad", 0))
    pads = list(_attr(node, "pads", [0] * (2 * nd)))
    if torch is None or shape is None or auto_pad != "NOTSET" or _attr(node, "ceil_mode", 0):
        # each output averages k values (fewer at borders without include_pad: bound by 1)
        bound = math.sqrt(window_overlap(kernel, strides, dil) / k) if include_pad or not any(pads) else 1.0
        return L[0] * min(1.0, bound)
    F = torch.nn.functional
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    flat = [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])]

    def build(dtype):
        ones = torch.ones((1, 1, *kernel), dtype=dtype)
        kw = dict(stride=strides, dilation=dil)
        sp = (1, 1, *shape[2:])
        count = conv(F.pad(torch.ones(sp, dtype=dtype), flat), ones, **kw) if not include_pad else float(k)
        return lambda x: conv(F.pad(x, flat), ones, **kw) / count

    if node.name not in ctx.cache:
        with torch.no_grad():
            ctx.cache[node.name] = linear_map_norm(build, (1, 1, *shape[2:]), tol=1e-5, max_iter=500, seed=0, init=None).value
    return L[0] * ctx.cache[node.name]


@register_rule("Conv", "ConvTranspose", "Gemm", "MatMul")
def _weighted(node, L, ctx):
    norm = ctx.layer_norms.get(node.name)
    if norm is None:
        return NoRule("weighted node without an operator norm (skipped layer)")
    layer = ctx.pm.layer(node.name)
    return float(norm) * L[list(node.input).index(layer.input)]


def _propagate(pm: PreparedModel, start: str, ctx: RuleContext, unknown: dict[str, None]) -> dict[str, float | None]:
    """Bound of every tensor w.r.t. a perturbation of ``start`` (absent = 0: not downstream)."""
    bounds: dict[str, float | None] = {start: 1.0}
    for node in pm.model.graph.node:
        ins = [bounds.get(n, 0.0) if n else 0.0 for n in node.input]
        if all(v == 0.0 for v in ins):
            continue
        if any(v is None for v in ins):
            out: float | NoRule | None = None
        else:
            rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            try:
                out = rule(node, ins, ctx) if rule is not None else NoRule("no bound rule")
            except Exception as exc:  # a malformed node must not crash the analysis
                out = NoRule(f"rule failed: {type(exc).__name__}: {exc}")
            if isinstance(out, NoRule):
                unknown[f"{node.name} ({node.op_type if node.domain in ('', 'ai.onnx') else node.domain + '.' + node.op_type})"] = None
                out = None
        for o in node.output:
            if o and o != start:
                bounds[o] = out
    return bounds


def network_bounds(pm: PreparedModel, layer_norms: Mapping[str, float]) -> NetworkBounds:
    """Whole-network bound, and per layer the bound downstream of its output and upstream of its input."""
    ctx = RuleContext(pm, layer_norms)
    unknown: dict[str, None] = {}
    from_input = _propagate(pm, pm.input_name, ctx, unknown)
    gains: dict[str, float | None] = {}
    upstream: dict[str, float | None] = {}
    for layer in pm.layers:
        upstream[layer.name] = from_input.get(layer.input, 0.0)
        gains[layer.name] = _propagate(pm, layer.output, ctx, unknown).get(pm.output_name, 0.0)
    return NetworkBounds(
        network_bound=from_input.get(pm.output_name, 0.0),
        unknown_ops=tuple(unknown),
        gains=MappingProxyType(gains),
        upstream=MappingProxyType(upstream),
    )
