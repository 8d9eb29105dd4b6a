"""Whole-network bounds: propagate per-op rules over the graph from the input (the network bound)
and from each layer's output (its gain to the network output)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ..graph import PreparedModel
from .rules import RULES, NoRule, RuleContext

__all__ = ["NetworkBounds", "network_bounds"]


@dataclass(frozen=True)
class NetworkBounds:
    network_bound: float | None
    unknown_ops: tuple[str, ...]
    gains: Mapping[str, float | None]
    upstream: Mapping[str, float | None]


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
