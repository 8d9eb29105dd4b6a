"""Bound rules of activations, and the self-gated products torch exports as a Mul.

The constants are the maxima of |f'| (a continuous, piecewise-differentiable f has Lipschitz
constant sup |f'|), found on a fine grid and rounded up:

- SiLU x*sigmoid(x): f' = s(1 + x(1 - s)), max 1.09984 at x ~ 2.399 (min -0.0998);
- GELU x*Phi(x): f' = Phi + x*phi, max 1.12890 at x = sqrt(2) (the tanh approximation: 1.12899);
- x*sigmoid(a x) (QuickGelu) and x*g(x/c) in general are scale-free: f'(x) = g(t) + t g'(t), t = x/c,
  so the maximum does not depend on a or c;
- Mish x*tanh(softplus(x)): max 1.08850.
"""

from __future__ import annotations

import math

import onnx

from .registry import NoRule, RuleContext, attr, register_rule

__all__ = ["SILU_MAX", "GELU_MAX", "ERF_MAX", "MISH_MAX", "ERF_GATE_MAX", "hard_swish_slope", "self_gated"]

SILU_MAX = 1.0999
GELU_MAX = 1.1290  # covers the erf form (1.128904) and the tanh approximation (1.128993)
ERF_MAX = 2.0 / math.sqrt(math.pi)
MISH_MAX = 1.0886
ERF_GATE_MAX = 1.25781  # max |erf(t) + 2/sqrt(pi) t exp(-t^2)|, the slope of x*erf(x/c) beyond x


def hard_swish_slope(alpha: float, beta: float) -> float:
    """max |d/dx x*clip(alpha x + beta, 0, 1)|: 1 where the clip is 1, 0 where it is 0, and
    2 alpha x + beta in between, which runs from -beta to 2 - beta."""
    if alpha == 0:
        return abs(min(1.0, max(0.0, beta)))
    return max(1.0, abs(beta), abs(2.0 - beta))


def _unary(fn):
    def rule(node, L, ctx):
        if any(L[1:]):
            return NoRule(f"{node.op_type} with a perturbed parameter input")
        return fn(node) * L[0]

    return rule


register_rule("LeakyRelu")(_unary(lambda n: max(1.0, abs(attr(n, "alpha", 0.01)))))
register_rule("Elu", "Celu")(_unary(lambda n: max(1.0, abs(attr(n, "alpha", 1.0)))))
register_rule("Selu")(_unary(lambda n: abs(attr(n, "gamma", 1.0507)) * max(1.0, abs(attr(n, "alpha", 1.6733)))))
register_rule("HardSigmoid")(_unary(lambda n: abs(attr(n, "alpha", 0.2))))
register_rule("HardSwish")(_unary(lambda n: hard_swish_slope(1 / 6, 0.5)))  # = 1.5 at x = 3
register_rule("Erf")(_unary(lambda n: ERF_MAX))
register_rule("Gelu")(_unary(lambda n: GELU_MAX))  # opset 20, approximate "none" or "tanh"
register_rule("Mish")(_unary(lambda n: MISH_MAX))
register_rule("Gelu", "FastGelu", "BiasGelu", domain="com.microsoft")(lambda n, L, ctx: GELU_MAX * sum(L[:2]))
register_rule("QuickGelu", domain="com.microsoft")(_unary(lambda n: SILU_MAX))


@register_rule("PRelu")
def _prelu(node, L, ctx):
    slope = ctx.max_abs(node.input[1])
    if L[1] or ctx.const(node.input[1]) is None:
        return NoRule("PRelu with a non-constant slope")
    return max(1.0, slope) * L[0]


@register_rule("Shrink")
def _shrink(node, L, ctx):  # continuous only when bias == lambd (soft shrink); else it jumps at +-lambd
    if abs(attr(node, "bias", 0.0) - attr(node, "lambd", 0.5)) > 0:
        return NoRule("Shrink with bias != lambd is discontinuous")
    return L[0]


@register_rule("LogSoftmax")
def _log_softmax(node, L, ctx):
    """y = x - logsumexp(x): Jacobian I - 1 p^T, an oblique projection (p^T 1 = 1) of norm
    ||1|| ||p|| = sqrt(n) ||p||_2 <= sqrt(n), n the size of the normalised axis (approached as p -> one-hot)."""
    shape = ctx.shape(node.input[0])
    if shape is None:
        return NoRule("LogSoftmax: input shape unknown")
    opset = ctx.pm.opset or 13
    axis = attr(node, "axis", -1 if opset >= 13 else 1)
    axis = axis + len(shape) if axis < 0 else axis
    n = math.prod(shape[axis:]) if opset < 13 else shape[axis]  # opset < 13: the trailing dims flattened
    return math.sqrt(n) * L[0]


def _scaled(ctx: RuleContext, name: str, x: str) -> bool:
    """``name`` is ``x`` or ``x`` times (divided by) a non-zero constant scalar."""
    if name == x:
        return True
    node = ctx.producer(name)
    if node is None or node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return False
    if node.op_type == "Div" and node.input[0] != x:
        return False
    other = node.input[1] if node.input[0] == x else node.input[0] if node.input[1] == x else None
    c = None if other is None else ctx.const(other)
    return c is not None and c.size == 1 and float(c.ravel()[0]) != 0.0


def _gate_slope(ctx: RuleContext, gate: onnx.NodeProto | None, x: str) -> float | None:
    """The max slope of x * gate(x) when ``gate`` is a one-input activation of (a scaled) ``x``."""
    if gate is None:
        return None
    if gate.op_type == "Sigmoid" and _scaled(ctx, gate.input[0], x):
        return SILU_MAX
    if gate.op_type == "HardSigmoid" and _scaled(ctx, gate.input[0], x):
        return hard_swish_slope(float(attr(gate, "alpha", 0.2)), float(attr(gate, "beta", 0.5)))
    if gate.op_type in ("Add", "Sub") and len(gate.input) == 2:  # k +- erf(x / c): the decomposed GELU (k = 1: 2 GELU)
        for i in (0, 1):
            erf, k = ctx.producer(gate.input[i]), ctx.const(gate.input[1 - i])
            if erf is not None and erf.op_type == "Erf" and k is not None and k.size == 1 and _scaled(ctx, erf.input[0], x):
                return abs(float(k.ravel()[0])) + ERF_GATE_MAX
    return None


def self_gated(node: onnx.NodeProto, L: list, ctx: RuleContext) -> float | None:
    """The global bound of ``Mul(x, gate(x))`` (SiLU/swish, hard-swish, QuickGelu, decomposed GELU),
    or None when the Mul is not such a product."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    for i in (0, 1):
        x, g = node.input[i], node.input[1 - i]
        slope = _gate_slope(ctx, ctx.producer(g), x)
        if slope is not None:
            return slope * L[i]
    return None
