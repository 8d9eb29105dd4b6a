"""Adaptive rounding of a large 2-D convolution through its input Gram matrix.

A convolution is a linear map of each output position's input patch ``x`` (``D = C_in/groups *
kh * kw`` values): ``y_c = w_c . x``. Its reconstruction error over every (example, position) row,
``sum ||W_hat x_q - W x_f||^2`` (``x_q`` the layer's inputs, ``x_f`` the float model's when the
target comes from other inputs), depends on the data only through

    H = sum x_q x_q^T,   M = sum x_q (x_q - x_f)^T   (D x D, per group)   and a constant,

since with ``Delta = W_hat - W``: ``error = tr(Delta H Delta^T) + 2 tr(Delta (W M^T)^T) + sum ||W (x_q - x_f)||^2``.
Built once, each step then costs ``C_out * D^2`` instead of a minibatch's ``batch * positions * D *
C_out``, uses all the data (no minibatch noise), and the hard-rounded error every check is exact.
On the ResNet-18 at 224x224 one fit is 4-60x faster except on the 7x7 layers, where the
minibatch stays (:func:`use_gram`'s cost rule). Layers whose minibatch step is cheap keep it, so
small models' roundings are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..graph import Layer

__all__ = ["GRAM_MIN_MACS", "GRAM_MAX_DIM", "Gram", "use_gram", "build_gram"]

GRAM_MIN_MACS = 1 << 38  # minibatch fits cheaper than this (~5 s on 2 cores) keep it: small models unchanged
GRAM_MAX_DIM = 8192  # patch size above which H (D x D per group, float64) is not built
_ROWS = 1 << 16  # rows of patches per chunk while accumulating H


def _geometry(layer: Layer, shape: tuple[int, ...]):
    """(groups, D per group, output positions per example, torch pad list, unfold kwargs) of a 2-D Conv."""
    a = layer.attrs
    kernel, strides, dil = tuple(a["kernel_shape"]), tuple(a["strides"]), tuple(a["dilations"])
    begin, end = list(a["pads"][:2]), list(a["pads"][2:])
    groups = int(a["group"])
    c_in = int(shape[1])
    d = c_in // groups * kernel[0] * kernel[1]
    outs = [(n + b + e - (k - 1) * dl - 1) // s + 1 for n, b, e, k, dl, s in zip(shape[2:], begin, end, kernel, dil, strides)]
    pad = [begin[1], end[1], begin[0], end[0]]
    return groups, d, outs[0] * outs[1], pad, dict(kernel_size=kernel, dilation=dil, stride=strides)


def use_gram(forced: bool | None, layer: Layer, shape: tuple[int, ...], iterations: int, batch: int) -> bool:
    """Whether to fit ``layer`` (inputs of ``shape``) through its Gram matrix: forced True/False, or
    (None) where it is a 2-D Conv, its minibatch fit would cost more than :data:`GRAM_MIN_MACS`
    multiply-adds and building ``H`` plus the steps costs less than the minibatch steps."""
    if forced is False or layer.op_type != "Conv" or len(layer.weight_shape) != 4 or len(shape) != 4:
        return False
    groups, d, positions, _, _ = _geometry(layer, shape)
    c_out, n = int(layer.weight_shape[0]), int(shape[0])
    if d > GRAM_MAX_DIM:
        return False
    if forced:
        return True
    minibatch = iterations * min(batch, n) * positions * d * c_out
    gram = 2 * n * positions * d * d * groups + iterations * c_out * d * d
    return minibatch >= GRAM_MIN_MACS and gram < minibatch


@dataclass(frozen=True, eq=False)
class Gram:
    """``H`` (groups, D, D) and ``B = W M^T`` (groups, C_out/groups, D), float64 torch tensors
    (``B`` None when the target comes from the same inputs), the constant, and the rows' examples."""

    h: Any
    b: Any
    const: float
    examples: int
    groups: int

    def grouped(self, w):
        """A weight (C_out, C_in/groups, kh, kw) as (groups, C_out/groups, D)."""
        return w.reshape(self.groups, w.shape[0] // self.groups, -1)

    def error(self, w_hat, w) -> float:
        """The exact reconstruction error per example of ``w_hat`` (float64)."""
        d = self.grouped(w_hat.double() - w.double())
        e = float((d.bmm(self.h) * d).sum())
        if self.b is not None:
            e += 2.0 * float((d * self.b).sum())
        return max(e + self.const, 0.0) / self.examples

    def surrogate(self, w_hat, w, h32):
        """A scalar whose gradient in ``w_hat`` is the error's (one matmul; ``h32`` = H in float32)."""
        d = self.grouped(w_hat - w)
        g = 2.0 * d.detach().bmm(h32)
        if self.b is not None:
            g = g + 2.0 * self.b.float()
        return (g * d).sum() / self.examples


def build_gram(torch, layer: Layer, a, w, target_inputs=None) -> Gram:
    """Accumulate ``H`` (and, when ``target_inputs`` differ from ``a``, ``M`` and the float
    weights' own error ``sum ||W (x_q - x_f)||^2``) over every row of patches of ``a`` (N, C, H, W),
    in chunks."""
    F = torch.nn.functional
    groups, d, positions, pad, kw = _geometry(layer, tuple(a.shape))
    h = torch.zeros((groups, d, d), dtype=torch.float64)
    m = None if target_inputs is None else torch.zeros((groups, d, d), dtype=torch.float64)
    wg = w.reshape(groups, w.shape[0] // groups, d)
    const = 0.0
    step = max(1, _ROWS // max(positions, 1))

    def rows(x):  # (n, C, H, W) -> (groups, n * positions, D)
        p = F.unfold(F.pad(x, pad), **kw)  # (n, C * kh * kw, L), channel-major like the weight
        return p.reshape(p.shape[0], groups, d, -1).permute(1, 0, 3, 2).reshape(groups, -1, d)

    with torch.no_grad():
        for i in range(0, len(a), step):
            xq = rows(a[i:i + step])
            h += xq.transpose(1, 2).bmm(xq).double()
            if m is not None:
                e = xq - rows(target_inputs[i:i + step])
                m += xq.transpose(1, 2).bmm(e).double()
                const += float((e.bmm(wg.transpose(1, 2)).double() ** 2).sum())
        b = None if m is None else wg.double().bmm(m.transpose(1, 2))
    return Gram(h, b, const, int(len(a)), groups)
