"""Torch handlers of the mirror: elementwise math, activations, comparisons and logic.

ONNX defaults are spelled out (HardSigmoid alpha 0.2 / beta 0.5, Selu's alpha and gamma, ...).
Binary ops broadcast numpy-style, as torch does. Comparisons and logic return bool tensors and
carry no gradient; ``Where`` passes gradients to whichever branch it selects.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .mirror import NodeContext, register

__all__: list[str] = []


def _unary(op_type: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    register(op_type)(lambda ctx, a: [fn(a[0])])


for _name, _fn in {
    "Erf": torch.erf, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal,
    "Neg": torch.neg, "Abs": torch.abs, "Sign": torch.sign, "Softsign": F.softsign, "Mish": F.mish,
}.items():
    _unary(_name, _fn)


# ---------------------------------------------------------------- activations with attributes


@register("HardSigmoid")
def _hard_sigmoid(ctx: NodeContext, a: list[Any]) -> list[Any]:
    alpha, beta = float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5))
    return [torch.clamp(alpha * a[0] + beta, 0.0, 1.0)]


@register("HardSwish")
def _hard_swish(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]  # x * HardSigmoid(x) with alpha = 1/6, beta = 0.5 (opset 14)
    return [x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)]


@register("Gelu")
def _gelu(ctx: NodeContext, a: list[Any]) -> list[Any]:
    approximate = ctx.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ctx.fail(f"Gelu approximate={approximate!r} is not supported")
    return [F.gelu(a[0], approximate=approximate)]


@register("Softplus")
def _softplus(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [torch.log1p(torch.exp(-a[0].abs())) + torch.relu(a[0])]  # log(1 + e^x), stable for large |x|


@register("Elu")
def _elu(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [F.elu(a[0], float(ctx.attr("alpha", 1.0)))]


@register("Celu")
def _celu(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [F.celu(a[0], float(ctx.attr("alpha", 1.0)))]


@register("Selu")
def _selu(ctx: NodeContext, a: list[Any]) -> list[Any]:
    alpha = float(ctx.attr("alpha", 1.67326319217681884765625))
    gamma = float(ctx.attr("gamma", 1.05070102214813232421875))
    x = a[0]
    return [gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1.0))]


@register("ThresholdedRelu")
def _thresholded_relu(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x = a[0]
    return [torch.where(x > float(ctx.attr("alpha", 1.0)), x, torch.zeros_like(x))]


@register("PRelu")
def _prelu(ctx: NodeContext, a: list[Any]) -> list[Any]:
    x, slope = a[0], a[1]
    return [torch.where(x >= 0, x, x * slope)]  # slope broadcasts unidirectionally to x


@register("Pow")
def _pow(ctx: NodeContext, a: list[Any]) -> list[Any]:
    base, exponent = a[0], a[1]
    return [torch.pow(base, exponent.to(base.dtype))]  # the output has the base's type


# ---------------------------------------------------------------- variadic


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[NodeContext, list[Any]], list[Any]]:
    def handler(ctx: NodeContext, a: list[Any]) -> list[Any]:
        parts = [t for t in a if t is not None]
        out = parts[0]
        for t in parts[1:]:
            out = fn(out, t)
        return [out]

    return handler


register("Max")(_variadic(torch.maximum))
register("Min")(_variadic(torch.minimum))
register("Sum")(_variadic(torch.add))


@register("Mean")
def _mean(ctx: NodeContext, a: list[Any]) -> list[Any]:
    parts = [t for t in a if t is not None]
    return [_variadic(torch.add)(ctx, parts)[0] / len(parts)]


@register("Mod")
def _mod(ctx: NodeContext, a: list[Any]) -> list[Any]:
    if int(ctx.attr("fmod", 0)):
        return [torch.fmod(a[0], a[1])]
    return [torch.remainder(a[0], a[1])]  # integer Mod: the sign follows the divisor


# ---------------------------------------------------------------- comparisons, logic, selection

for _name, _fn in {"Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
                   "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
                   "Xor": torch.logical_xor}.items():
    register(_name)((lambda fn: lambda ctx, a: [fn(a[0], a[1])])(_fn))


@register("Not")
def _not(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [torch.logical_not(a[0])]


@register("Where")
def _where(ctx: NodeContext, a: list[Any]) -> list[Any]:
    return [torch.where(a[0].to(torch.bool), a[1], a[2])]
