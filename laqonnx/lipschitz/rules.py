"""The bound-rule registry: per-op rules ``rule(node, in_bounds, ctx) -> float | NoRule`` bounding
the Lipschitz constant of every output of a node from those of its inputs (:data:`RULES`,
:func:`register_rule`), and the rules for the standard ops."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graph import PreparedModel
from .maps import _torch, window_overlap
from .solvers import linear_map_norm

__all__ = ["NoRule", "RuleContext", "Rule", "RULES", "register_rule"]


@dataclass(frozen=True)
class NoRule:
    """Returned by a rule that cannot bound its node (a value, not an exception)."""

    reason: str


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
