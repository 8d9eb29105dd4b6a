"""The bound-rule registry and what a rule sees.

A rule is ``rule(node, in_bounds, ctx) -> float | DataDependent | NoRule``: an upper bound on the
L2 Lipschitz constant of every output of ``node`` w.r.t. the perturbed input (``in_bounds[i]`` is
the bound carried by input i: 0.0 for constants and tensors not downstream of the perturbation).
A plain float is a global bound; :class:`DataDependent` is a bound that holds on the calibration
data only (it reads :attr:`RuleContext.ranges`); :class:`NoRule` says the node cannot be bounded.
Rules are keyed by ``(domain, op_type)``; the default domain is ``""`` (``"ai.onnx"`` is the same).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import onnx

from ..graph import PreparedModel

__all__ = ["NoRule", "DataDependent", "RuleContext", "Rule", "RULES", "register_rule", "rule_for", "normal_domain",
           "op_label", "NEEDS_RANGES"]

NEEDS_RANGES = "data-dependent: needs calibration ranges (analyze --calib DATA)"


@dataclass(frozen=True)
class NoRule:
    """Returned by a rule that cannot bound its node (a value, not an exception)."""

    reason: str


@dataclass(frozen=True)
class DataDependent:
    """A bound that holds on the calibration data (from the calibrated ranges), not for every input."""

    value: float


@dataclass(frozen=True)
class RuleContext:
    """What a rule may look at: constants, batch-1 shapes, the layer norms, the graph's producers,
    and (optional) calibrated ranges ``tensor name -> (min, max)`` over the calibration data."""

    pm: PreparedModel
    layer_norms: Mapping[str, float]
    ranges: Mapping[str, tuple[float, float]] | None = None
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

    def size(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else int(np.prod(shape, dtype=np.int64))

    def producer(self, name: str) -> onnx.NodeProto | None:
        """The node whose output is ``name`` (None for graph inputs and initializers)."""
        if "producers" not in self.cache:
            self.cache["producers"] = MappingProxyType(
                {o: n for n in self.pm.model.graph.node for o in n.output if o})
        return self.cache["producers"].get(name)

    def range(self, name: str) -> tuple[float, float] | None:
        """The calibrated (min, max) of ``name``: None without ranges or for a tensor not calibrated."""
        if self.ranges is None:
            return None
        r = self.ranges.get(name)
        if r is None:
            c = self.const(name)
            if c is not None and c.size and np.issubdtype(c.dtype, np.number):
                return float(c.min()), float(c.max())
            return None
        return float(r[0]), float(r[1])

    def max_abs(self, name: str) -> float | None:
        """max |value| of ``name``: exact for a constant, calibrated otherwise (None if unknown)."""
        c = self.const(name)
        if c is not None:
            return float(np.max(np.abs(c.astype(np.float64)), initial=0.0))
        r = self.range(name)
        return None if r is None else max(abs(r[0]), abs(r[1]))

    def broadcast(self, name: str, output: str) -> float | None:
        """sqrt(size(output) / size(name)): how much broadcasting ``name`` to ``output`` can grow a
        perturbation in L2 (each element is copied at most that many times); None if a size is unknown."""
        n_in, n_out = self.size(name), self.size(output)
        if not n_in or not n_out:
            return None
        return math.sqrt(max(1.0, n_out / n_in))


Rule = Callable[[onnx.NodeProto, list, RuleContext], "float | DataDependent | NoRule"]
RULES: dict[tuple[str, str], Rule] = {}


def normal_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def op_label(node: onnx.NodeProto) -> str:
    domain = normal_domain(node.domain)
    return node.op_type if not domain else f"{domain}.{node.op_type}"


def register_rule(*ops: str, domain: str = ""):
    """Register ``rule(node, in_bounds, ctx) -> float | DataDependent | NoRule`` for ``ops`` of ``domain``.

    ``in_bounds[i]`` is the bound carried by input i (0.0 for constants and tensors not downstream
    of the perturbation); the result bounds every output of the node.
    """
    key_domain = normal_domain(domain)

    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES[(key_domain, op)] = fn
        return fn

    return deco


def rule_for(node: onnx.NodeProto) -> Rule | None:
    return RULES.get((normal_domain(node.domain), node.op_type))


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default
