"""The bound rules of the standard linear and structural ops, and the public face of the registry
(:data:`RULES`, :func:`register_rule`: see :mod:`.registry`). Activations are in
:mod:`.rules_nonlinear`, products and other data-dependent rules in :mod:`.rules_data`, Resize in
:mod:`.rules_resize`; importing this module registers them all.

Multi-input elementwise ops broadcast: a perturbed input broadcast to a larger output is copied,
which grows its perturbation by sqrt(size(output) / size(input)) (:meth:`RuleContext.broadcast`).
"""

from __future__ import annotations

import math

import numpy as np

from .maps import _torch, window_overlap
from .registry import RULES, DataDependent, NoRule, Rule, RuleContext, attr, register_rule
from .solvers import linear_map_norm

__all__ = ["NoRule", "DataDependent", "RuleContext", "Rule", "RULES", "register_rule"]

_attr = attr


def _unary(value: float) -> Rule:
    """``value`` times the bound of input 0; other inputs (shapes, axes, limits) must not be perturbed."""

    def rule(node, L, ctx):
        if any(L[1:]):
            return NoRule(f"{node.op_type} with a perturbed parameter input")
        return value * L[0]

    return rule


register_rule("Relu", "Clip", "Tanh", "Dropout", "Identity", "Reshape", "Flatten", "Transpose", "Squeeze",
              "Unsqueeze", "Softmax", "Abs", "Neg", "Softplus", "Softsign", "Slice", "Split", "Cast",
              "GlobalMaxPool", "DepthToSpace", "SpaceToDepth", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceLogSumExp",
              "Sin", "Cos", "Shrink")(_unary(1.0))
register_rule("Sigmoid")(_unary(0.25))
# the value does not depend on the input's values: a perturbation changes nothing
register_rule("Shape", "Size", "Constant", "ConstantOfShape", "EyeLike")(lambda node, L, ctx: 0.0)


@register_rule("Sign", "Floor", "Ceil", "Round", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "ArgMax",
               "ArgMin", "Hardmax", "IsNaN", "IsInf", "Not", "And", "Or", "Xor", "BitShift", "Mod", "NonZero",
               "QuantizeLinear", "TopK")
def _discontinuous(node, L, ctx):
    # piecewise constant or integer-valued: a tiny perturbation can jump the output, so no finite bound
    # (a bound of 0 here would hide the jump and print a network bound of 0)
    return NoRule(f"{node.op_type} is discontinuous in its input: no Lipschitz bound")


def _broadcast_sum(node, L, ctx) -> list[float] | NoRule:
    """Each perturbed input's bound times its broadcast factor to the output."""
    out = []
    for name, b in zip(node.input, L):
        if not b:
            out.append(0.0)
            continue
        f = ctx.broadcast(name, node.output[0])
        if f is None:
            return NoRule(f"{node.op_type}: shapes unknown (broadcasting)")
        out.append(f * b)
    return out


@register_rule("Add", "Sub", "Sum", "Mean")
def _add(node, L, ctx):
    parts = _broadcast_sum(node, L, ctx)
    if isinstance(parts, NoRule):
        return parts
    return sum(parts) / (len(L) if node.op_type == "Mean" else 1)


@register_rule("Max", "Min")
def _max_min(node, L, ctx):  # |max(a,b) - max(a',b')| <= max(|da|, |db|) elementwise
    parts = _broadcast_sum(node, L, ctx)
    if isinstance(parts, NoRule):
        return parts
    return math.sqrt(sum(x * x for x in parts))


register_rule("Concat")(lambda node, L, ctx: math.sqrt(sum(x * x for x in L)))


@register_rule("Where")
def _where(node, L, ctx):  # a selection: |out_i - out'_i| <= max(|da_i|, |db_i|) while the condition holds
    if L[0]:
        return NoRule("Where with a perturbed condition (discontinuous)")
    parts = _broadcast_sum(node, L, ctx)
    if isinstance(parts, NoRule):
        return parts
    return math.sqrt(sum(x * x for x in parts))


@register_rule("BatchNormalization")
def _batchnorm(node, L, ctx):
    params = [ctx.const(n) for n in node.input[1:5]]
    if any(p is None for p in params) or any(L[1:]):
        return NoRule("BatchNormalization with non-constant parameters")
    gamma, _, _, var = (p.astype(np.float64) for p in params)
    return float(np.max(np.abs(gamma / np.sqrt(var + _attr(node, "epsilon", 1e-5))))) * L[0]


@register_rule("GlobalAveragePool", "ReduceMean", "ReduceSum", "ReduceL1")
def _reduce(node, L, ctx):
    """Each output sums (mean: averages) k = n_in / n_out inputs: operator norm sqrt(k) (mean 1/sqrt(k))."""
    if any(L[1:]):
        return NoRule(f"{node.op_type} with perturbed axes")
    n_in, n_out = ctx.size(node.input[0]), ctx.size(node.output[0])
    mean = node.op_type in ("GlobalAveragePool", "ReduceMean")
    if not n_in or not n_out:
        return L[0] if mean else NoRule(f"{node.op_type}: shapes unknown")
    return L[0] * math.sqrt(n_out / n_in if mean else n_in / n_out)


@register_rule("Expand", "Tile")
def _broadcast(node, L, ctx):
    if any(L[1:]):
        return NoRule(f"{node.op_type} with a perturbed shape input")
    f = ctx.broadcast(node.input[0], node.output[0])
    return NoRule("output shape unknown") if f is None else L[0] * f


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
    mode = _attr(node, "mode", "constant")
    if any(L[1:]):
        return NoRule("Pad with a perturbed pads or pad value")
    if mode == "constant":  # cropping (negative pads) only drops elements
        return L[0]
    pads = ctx.const(node.input[1]) if len(node.input) > 1 else np.array(_attr(node, "pads", []))
    if pads is None:
        return NoRule("Pad with non-constant pads")
    pads = np.maximum(np.asarray(pads, dtype=np.int64), 0)
    half = len(pads) // 2
    if mode == "reflect":  # each element: itself plus at most one mirror copy per padded side (pad < size)
        factor = np.prod([1 + int(pads[i] > 0) + int(pads[i + half] > 0) for i in range(half)])
    else:  # edge, wrap: each padded position copies one element, so an element is copied at most 1 + pads times
        factor = np.prod([1 + int(pads[i]) + int(pads[i + half]) for i in range(half)])
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
    auto_pad = _attr(node, "auto_pad", "NOTSET")
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
        kw = {"stride": strides, "dilation": dil}
        sp = (1, 1, *shape[2:])
        count = conv(F.pad(torch.ones(sp, dtype=dtype), flat), ones, **kw) if not include_pad else float(k)
        return lambda x: conv(F.pad(x, flat), ones, **kw) / count

    if node.name not in ctx.cache:
        with torch.no_grad():
            ctx.cache[node.name] = linear_map_norm(build, (1, 1, *shape[2:]), tol=1e-5, max_iter=500, seed=0, init=None).value
    return L[0] * ctx.cache[node.name]


@register_rule("Conv", "ConvTranspose", "Gemm", "MatMul")
def _weighted(node, L, ctx):
    if node.name not in ctx.layer_norms and node.op_type == "MatMul":
        from .rules_data import matmul_pair

        return matmul_pair(node, L, ctx)  # a product of two activations, or skipped
    norm = ctx.layer_norms.get(node.name)
    if norm is None:
        return NoRule("weighted node without an operator norm (skipped layer)")
    layer = ctx.pm.layer(node.name)
    i = list(node.input).index(layer.input)
    if any(b for j, b in enumerate(L) if j != i):
        return NoRule(f"{node.op_type} with a perturbed weight or bias")
    return float(norm) * L[i]


from . import rules_data, rules_nonlinear, rules_resize  # noqa: F401  (register their rules)
