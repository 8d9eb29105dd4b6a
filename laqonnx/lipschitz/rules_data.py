"""Rules whose bound depends on the values flowing through the node: products of two perturbed
tensors (SE blocks, attention), Exp, Log, Sqrt, Pow, Reciprocal, a perturbed divisor, and the
tighter LayerNormalization bound.

No global bound exists for these (x*y, e^x grow without limit); with calibrated ranges
(:attr:`RuleContext.ranges`) they return :class:`DataDependent`: a bound of the local gain at the
calibration data, from max |value| (min |value| for divisors) over the calibrated range. A
constant operand is exact and makes the bound global again. Without ranges they return
``NoRule(NEEDS_RANGES)``.

Products use ``a'b' - ab = a (b' - b) + b' (a' - a)``: elementwise |d(ab)| <= max|a| |db| + max|b| |da|,
so ``||d(ab)|| <= max|a| bc_b L_b + max|b| bc_a L_a`` with bc the broadcast factors.
"""

from __future__ import annotations

import math

import numpy as np

from .registry import NEEDS_RANGES, DataDependent, NoRule, RuleContext, attr, register_rule
from .rules_nonlinear import self_gated

__all__ = ["matmul_pair", "inv_std_name"]


def _missing(ctx: RuleContext, name: str) -> NoRule:
    return NoRule(NEEDS_RANGES if ctx.ranges is None else f"no calibrated range for {name!r}")


def _result(value: float, ctx: RuleContext, names) -> float | DataDependent:
    """Global when every operand read was a constant, else data-dependent."""
    return float(value) if all(ctx.const(n) is not None for n in names) else DataDependent(float(value))


def _min_abs(ctx: RuleContext, name: str) -> float | None | NoRule:
    c = ctx.const(name)
    lo, hi = (float(c.min()), float(c.max())) if c is not None and c.size else ctx.range(name) or (None, None)
    if lo is None:
        return None
    if c is not None:
        m = float(np.min(np.abs(c.astype(np.float64))))
        return m if m > 0 else NoRule(f"{name!r} contains 0")
    if lo > 0 or hi < 0:
        return min(abs(lo), abs(hi))
    return NoRule(f"the calibrated range of {name!r} contains 0")


@register_rule("Mul")
def _mul(node, L, ctx):
    if L[0] and L[1]:
        gated = self_gated(node, L, ctx)
        if gated is not None:
            return gated
    total, read = 0.0, []
    for i in (0, 1):
        if not L[i]:
            continue
        other = node.input[1 - i]
        m = ctx.max_abs(other)
        if m is None:
            return _missing(ctx, other)
        bc = ctx.broadcast(node.input[i], node.output[0])
        if bc is None:
            return NoRule("Mul: shapes unknown (broadcasting)")
        total += m * bc * L[i]
        read.append(other)
    return _result(total, ctx, read)


@register_rule("Div")
def _div(node, L, ctx):
    a, b = node.input[0], node.input[1]
    inv = _min_abs(ctx, b)
    if isinstance(inv, NoRule):
        return NoRule(f"Div: {inv.reason}")
    if inv is None:
        return _missing(ctx, b)
    total, read = 0.0, [b]
    for i, scale in ((0, 1.0 / inv), (1, None)):
        if not L[i]:
            continue
        if scale is None:  # d(a/b) = -a db / b^2
            m = ctx.max_abs(a)
            if m is None:
                return _missing(ctx, a)
            scale = m / inv ** 2
            read.append(a)
        bc = ctx.broadcast(node.input[i], node.output[0])
        if bc is None:
            return NoRule("Div: shapes unknown (broadcasting)")
        total += scale * bc * L[i]
    return _result(total, ctx, read)


def _matrix_dims(shape: tuple[int, ...], left: bool) -> tuple[int, int, int]:
    """(batch, rows, cols) of a MatMul operand (numpy rules: a 1-D left operand is a row, a 1-D right one a column)."""
    if len(shape) == 1:
        return (1, 1, shape[0]) if left else (1, shape[0], 1)
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _operand_norm(ctx: RuleContext, name: str, rows: int, cols: int) -> float | None:
    """An upper bound on the spectral norm of every matrix of operand ``name``: exact for a constant,
    else the Frobenius norm of the max-abs matrix, max|value| sqrt(rows cols)."""
    c = ctx.const(name)
    if c is not None:
        m = c.astype(np.float64).reshape(-1, rows, cols) if c.ndim >= 2 else c.astype(np.float64).reshape(1, rows, cols)
        return float(max(np.linalg.norm(x, 2) for x in m))
    m = ctx.max_abs(name)
    return None if m is None else m * math.sqrt(rows * cols)


def matmul_pair(node, L, ctx):
    """C = A B with both operands activations: dC = dA B + A dB, ||dA_i B_i|| <= ||dA_i|| ||B_i||_2 per
    matrix of the batch; an operand broadcast over the other's batch repeats its perturbation."""
    sa, sb, sc = (ctx.shape(n) for n in (node.input[0], node.input[1], node.output[0]))
    if sa is None or sb is None or sc is None:
        return NoRule("MatMul: shapes unknown")
    (ba, m, k), (bb, _, n) = _matrix_dims(sa, True), _matrix_dims(sb, False)
    batch_out = max(1, math.prod(sc[:-2]) if len(sc) > 2 else 1)
    total, read = 0.0, []
    for i, (batch, other, rows, cols) in enumerate(((ba, node.input[1], k, n), (bb, node.input[0], m, k))):
        if not L[i]:
            continue
        norm = _operand_norm(ctx, other, rows, cols)
        if norm is None:
            return _missing(ctx, other)
        total += norm * math.sqrt(max(1.0, batch_out / batch)) * L[i]
        read.append(other)
    return _result(total, ctx, read)


def _elementwise(slope):
    """Rule of a unary op whose local slope on [lo, hi] is ``slope(lo, hi)`` (a float or a NoRule)."""

    def rule(node, L, ctx):
        if any(L[1:]):
            return NoRule(f"{node.op_type} with a perturbed parameter input")
        r = ctx.range(node.input[0])
        if r is None:
            return _missing(ctx, node.input[0])
        s = slope(node, ctx, *r)
        return s if isinstance(s, NoRule) else DataDependent(s * L[0])

    return rule


def _positive(what: str, fn):
    return lambda node, ctx, lo, hi: fn(lo, hi) if lo > 0 else NoRule(f"{what} of a calibrated range reaching {lo:.4g} <= 0")


register_rule("Exp")(_elementwise(lambda node, ctx, lo, hi: math.exp(hi)))
register_rule("Log")(_elementwise(_positive("Log", lambda lo, hi: 1.0 / lo)))
register_rule("Sqrt")(_elementwise(_positive("Sqrt", lambda lo, hi: 0.5 / math.sqrt(lo))))


def _no_zero(lo: float, hi: float) -> float | None:
    return min(abs(lo), abs(hi)) if lo > 0 or hi < 0 else None


@register_rule("Reciprocal")
def _reciprocal(node, L, ctx):
    return _elementwise(lambda node, ctx, lo, hi: NoRule("Reciprocal of a calibrated range containing 0")
                        if _no_zero(lo, hi) is None else _no_zero(lo, hi) ** -2)(node, L, ctx)


@register_rule("Pow")
def _pow(node, L, ctx):
    """|d x^p| = |p| |x|^(p-1): at max |x| for p >= 1, at min |x| (0 excluded) for p < 1."""
    p = ctx.const(node.input[1])
    if L[1] or p is None or p.size != 1:
        return NoRule("Pow with a non-constant or non-scalar exponent")
    p = float(p.ravel()[0])
    if p == 1.0:
        return L[0]
    if p == 0.0:
        return 0.0

    def slope(node, ctx, lo, hi):
        if p >= 1.0:
            return abs(p) * max(abs(lo), abs(hi)) ** (p - 1.0)
        m = _no_zero(lo, hi)
        return NoRule(f"Pow {p:g} of a calibrated range containing 0") if m is None else abs(p) * m ** (p - 1.0)

    return _elementwise(slope)(node, L[:1], ctx)


def inv_std_name(node) -> str:
    """The LayerNormalization output holding 1/sqrt(var + eps) (a calibration run names it if unnamed)."""
    return node.output[2] if len(node.output) > 2 and node.output[2] else f"{node.output[0]}::inv_std_dev"


@register_rule("LayerNormalization")
def _layer_norm(node, L, ctx):
    """y = gamma * (x - mu) s^-1 + beta, s = sqrt(var + eps): the Jacobian of each group is
    diag(gamma) s^-1 (I - c c^T / (n s^2)) (I - 1 1^T / n) with |c|^2 / (n s^2) = var / (var + eps) <= 1,
    so its norm is <= max|gamma| / s: globally max|gamma| / sqrt(eps), on the calibration data
    max|gamma| max(1/s) (1/s is the node's InvStdDev output)."""
    if any(L[1:]):
        return NoRule("LayerNormalization with perturbed scale or bias")
    if any(o for o in node.output[1:]):
        return NoRule("LayerNormalization whose Mean/InvStdDev outputs are used")
    gamma = ctx.max_abs(node.input[1])
    if ctx.const(node.input[1]) is None:
        return NoRule("LayerNormalization with a non-constant scale")
    eps = float(attr(node, "epsilon", 1e-5))
    bound = gamma / math.sqrt(eps) if eps > 0 else math.inf
    r = ctx.range(inv_std_name(node))
    if r is not None and gamma * r[1] < bound:
        return DataDependent(gamma * r[1] * L[0])
    return NoRule("LayerNormalization with epsilon 0: " + NEEDS_RANGES) if math.isinf(bound) else bound * L[0]
