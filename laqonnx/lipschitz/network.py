"""Whole-network bounds: propagate per-op rules over the graph from the input (the network bound)
and from each layer's output (its gain to the network output).

A tensor not downstream of the perturbation carries 0; a tensor downstream of a node without a
rule carries None (unknown), and so does everything computed from it: an unknown bound is never
reported as 0. Nodes with subgraphs (If, Loop, Scan) read outer tensors implicitly: those count as
their inputs, so a perturbation reaching a branch is not lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import onnx

from ..graph import PreparedModel
from ..vocab import BoundKind
from .registry import DataDependent, NoRule, RuleContext, op_label, rule_for
from .rules import RULES  # noqa: F401  (registers every rule)

__all__ = ["NetworkBounds", "network_bounds"]


@dataclass(frozen=True)
class NetworkBounds:
    """``network_bound`` None: unknown (``unknown_ops`` name the nodes without a rule). ``bound_kind``
    says whether it holds for every input (global) or on the calibration data (data-dependent);
    ``data_dependent`` names the nodes bounded from calibrated ranges."""

    network_bound: float | None
    unknown_ops: tuple[str, ...]
    gains: Mapping[str, float | None]
    upstream: Mapping[str, float | None]
    bound_kind: BoundKind | None = BoundKind.GLOBAL
    data_dependent: tuple[str, ...] = ()
    gain_kinds: Mapping[str, BoundKind | None] = field(default_factory=lambda: MappingProxyType({}))
    unknown_reasons: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # node -> why no rule


def _subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs read from the enclosing scope (If/Loop/Scan bodies)."""
    reads: list[str] = []
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
            for n in g.node:
                reads += [i for i in (*n.input, *_subgraph_reads(n)) if i and i not in local]
            reads += [o.name for o in g.output if o.name not in local]
    return reads


@dataclass
class _Walk:
    bounds: dict[str, float | None]
    data_dependent: set[str]  # tensors whose bound used a data-dependent rule


def _propagate(pm: PreparedModel, start: str, ctx: RuleContext, unknown: dict[str, str], dd_nodes: dict[str, None]) -> _Walk:
    """Bound of every tensor w.r.t. a perturbation of ``start`` (absent = 0: not downstream)."""
    walk = _Walk({start: 1.0}, set())
    bounds = walk.bounds
    for node in pm.model.graph.node:
        names = [n for n in node.input] + _subgraph_reads(node)
        ins = [bounds.get(n, 0.0) if n else 0.0 for n in names]
        if all(v == 0.0 for v in ins):
            continue
        dd = any(n in walk.data_dependent for n in names if n)
        if any(v is None for v in ins):
            out: float | None = None
        else:
            rule = rule_for(node)
            if len(names) > len(node.input):
                rule = None  # a subgraph reads the perturbed tensor: no rule bounds control flow
            try:
                result = rule(node, ins, ctx) if rule is not None else NoRule("no bound rule")
            except Exception as exc:  # a malformed node must not crash the analysis
                result = NoRule(f"rule failed: {type(exc).__name__}: {exc}")
            if isinstance(result, NoRule):
                unknown.setdefault(f"{node.name} ({op_label(node)})", result.reason)
                out = None
            elif isinstance(result, DataDependent):
                dd_nodes[f"{node.name} ({op_label(node)})"] = None
                out, dd = float(result.value), True
            else:
                out = float(result)
        for o in node.output:
            if o and o != start:
                bounds[o] = out
                if dd:
                    walk.data_dependent.add(o)
    return walk


def _kind(walk: _Walk, name: str) -> BoundKind | None:
    if walk.bounds.get(name, 0.0) is None:
        return None
    return BoundKind.DATA_DEPENDENT if name in walk.data_dependent else BoundKind.GLOBAL


def network_bounds(pm: PreparedModel, layer_norms: Mapping[str, float],
                   ranges: Mapping[str, tuple[float, float]] | None = None) -> NetworkBounds:
    """Whole-network bound, and per layer the bound downstream of its output and upstream of its input.

    ``ranges`` (tensor name -> calibrated (min, max)) lets the data-dependent rules bound products,
    Exp and the like on the calibration data (:mod:`.rules_data`); without it they are unknown.
    """
    ctx = RuleContext(pm, layer_norms, ranges)
    unknown: dict[str, str] = {}
    dd_nodes: dict[str, None] = {}
    from_input = _propagate(pm, pm.input_name, ctx, unknown, dd_nodes)
    gains: dict[str, float | None] = {}
    kinds: dict[str, BoundKind | None] = {}
    upstream: dict[str, float | None] = {}
    for layer in pm.layers:
        upstream[layer.name] = from_input.bounds.get(layer.input, 0.0)
        walk = _propagate(pm, layer.output, ctx, unknown, dd_nodes)
        gains[layer.name] = walk.bounds.get(pm.output_name, 0.0)
        kinds[layer.name] = _kind(walk, pm.output_name)
    return NetworkBounds(
        network_bound=from_input.bounds.get(pm.output_name, 0.0),
        unknown_ops=tuple(unknown),
        gains=MappingProxyType(gains),
        upstream=MappingProxyType(upstream),
        bound_kind=_kind(from_input, pm.output_name),
        data_dependent=tuple(dd_nodes),
        gain_kinds=MappingProxyType(kinds),
        unknown_reasons=MappingProxyType(dict(unknown)),
    )
