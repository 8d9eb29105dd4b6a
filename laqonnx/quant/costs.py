"""Budgets, the cost model and the choice under a budget.

A budget is a type: :class:`AvgBits` (parameter-weighted average weight bits over the weighted
layers, float counted as 32), :class:`MaxBytes` (the model's constants in bytes: quantized
weights with their scales and zero points, plus every other initializer as it is) or
:class:`MaxLatency` (milliseconds, or a fraction of the float model's latency, over a
:class:`~laqonnx.quant.latency_costs.LatencyTable` of measured per-layer costs, in 0.1 us units). The choice is
one knapsack group per activation source tensor (the layers reading it share one activation QDQ): an option is an
activation setting of the tensor plus one weight setting per layer that reads it, valued at the
activation's metric plus the weights' metrics; each layer's weight settings are Pareto-pruned
first (exact). :func:`choose` solves it exactly with :func:`laqonnx.quant.select.select`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import OptionError, PlanError
from ..graph import PreparedModel
from .metric import LayerTerms, Scored, WeightScore
from .numerics import PerChannel
from .select import Group, Option, select

__all__ = ["AvgBits", "MaxBytes", "MaxLatency", "parse_max_latency", "Budget", "LATENCY_UNITS_PER_MS", "Choice", "choose", "latency_floor_ms", "unfused_layers", "weight_bytes"]


@dataclass(frozen=True)
class AvgBits:
    """At most ``bits`` weight bits per parameter on average (int8/int4 mix, float = 32)."""

    bits: float

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not (isinstance(self.bits, (int, float)) and math.isfinite(self.bits) and self.bits > 0):
            raise OptionError(f"avg_weight_bits must be a number > 0, got {self.bits!r}")


@dataclass(frozen=True)
class MaxBytes:
    """At most ``bytes`` bytes of model constants."""

    bytes: int

    def __post_init__(self) -> None:
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, int) or self.bytes <= 0:
            raise OptionError(f"max_bytes must be a positive int, got {self.bytes!r}")


@dataclass(frozen=True)
class MaxLatency:
    """At most ``ms`` milliseconds, or ``relative`` times the float model's latency (exactly one), as
    the sum of measured per-layer costs (batch ``batch``)."""

    ms: float | None = None
    relative: float | None = None
    batch: int = 1

    def __post_init__(self) -> None:
        if (self.ms is None) == (self.relative is None):
            raise OptionError("MaxLatency takes exactly one of ms= or relative=")
        v = self.ms if self.ms is not None else self.relative
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise OptionError(f"max latency must be a number > 0, got {v!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise OptionError(f"latency batch must be a positive int, got {self.batch!r}")

    def limit_ms(self, float_ms: float) -> float:
        return float(self.ms) if self.ms is not None else float(self.relative) * float_ms

    def describe(self) -> str:
        return f"{self.ms:g} ms" if self.ms is not None else f"{self.relative:g}x the float model"


def parse_max_latency(text: str, batch: int = 1) -> MaxLatency:
    """``0.7x`` (relative to the float model) or ``3.5ms`` (absolute)."""
    t = str(text).strip().lower()
    try:
        if t.endswith("ms"):
            return MaxLatency(ms=float(t[:-2]), batch=batch)
        if t.endswith("x"):
            return MaxLatency(relative=float(t[:-1]), batch=batch)
    except ValueError:
        pass
    raise OptionError(f"--max-latency takes 0.7x (relative to the float model) or 3.5ms, got {text!r}")


LATENCY_UNITS_PER_MS = 10_000  # knapsack costs in 0.1 us


Budget = AvgBits | MaxBytes | MaxLatency


@dataclass(frozen=True)
class Choice:
    """Index of the chosen weight score per layer and activation score per tensor."""

    weights: dict[str, int]
    activations: dict[str, int]
    cost: int
    value: float


def weight_bytes(params: int, bits: int, scales: int) -> int:
    """Bytes of a weight: packed integers plus a float32 scale and an int8 zero point per scale."""
    if bits == 32:
        return 4 * params
    return math.ceil(params * bits / 8) + scales * 5


def _pareto(options: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    out: list[tuple[int, float, int]] = []
    for cost, value, idx in sorted(options, key=lambda t: (t[0], t[1], t[2])):
        if not out or value < out[-1][1]:
            out.append((cost, value, idx))
    return out


def _groups(scored: Scored, cost_of, by_activation: bool = False, penalty=None) -> tuple[list[Group], list[tuple[str, list[str]]]]:
    """One group per activation source tensor. ``cost_of(lt, score, activation)`` is a setting's cost
    (None: not offered); with ``by_activation`` it depends on the tensor's activation setting (latency:
    16-bit activations run unfused), so the weight fronts are built per activation setting;
    ``penalty(tensor, activation)``: a cost the activation setting adds outside the group's layers
    (latency: the int8 layers before the tensor, unfused by a 16-bit QuantizeLinear after them)."""
    by_input: dict[str, list[LayerTerms]] = {}
    for lt in scored.layers:
        by_input.setdefault(scored.source(lt.layer.input), []).append(lt)
    groups, members = [], []
    for tensor, terms in by_input.items():
        acts = scored.tensors[tensor]
        combos_by: dict[object, list[tuple[int, float, tuple[int, ...]]]] = {}
        options = []
        for ai, a in enumerate(acts):
            key = a.setting if by_activation else None
            if key not in combos_by:
                # a 16-bit QDQ in front of float layers only is not offered: slower than an 8-bit one (it
                # unfuses the layer before) and no use to them (they read float). Exact with pruning: each
                # layer keeps its front and its quantized settings' front, and a combination needs one
                # quantized layer.
                wide = by_activation and key is not None and key.bits == 16
                fronts = []
                for lt in terms:
                    costed = [o for o in ((cost_of(lt, s, key), s.metric, k) for k, s in enumerate(lt.scores)) if o[0] is not None]
                    front = _pareto(costed)
                    if wide:
                        front = sorted(set(front) | set(_pareto([o for o in costed if lt.scores[o[2]].setting is not None])))
                    fronts.append(front)
                combos: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
                for front in fronts:
                    combos = [(c + fc, v + fv, key_ + (k,)) for c, v, key_ in combos for fc, fv, k in front]
                if wide:
                    combos = [o for o in combos if any(lt.scores[k].setting is not None for lt, k in zip(terms, o[2]))]
                combos_by[key] = combos
            extra = penalty(tensor, a.setting) if penalty is not None else 0
            options.extend(Option(c + extra, a.metric + v, (ai, key_)) for c, v, key_ in combos_by[key])
        groups.append(Group(tensor, tuple(options)))
        members.append((tensor, [lt.layer.name for lt in terms]))
    return groups, members


def _latency_cost(latency):
    """A setting's latency in knapsack units (None: not offered), and the fixed rest."""
    if latency is None:
        raise OptionError("a MaxLatency budget needs a latency table (measured per-layer costs)")

    def cost_latency(lt: LayerTerms, s: WeightScore, activation=None) -> int | None:
        w = s.setting
        if w is not None and w.bits == 4 and lt.layer.op_type == "Conv":
            return None  # int4 Conv runs unfused on CPU: offered under a size budget only
        return round(latency.cost_ms(lt.layer.name, w, activation) * LATENCY_UNITS_PER_MS)

    return cost_latency, round(latency.rest_ms * LATENCY_UNITS_PER_MS)


def _latency_penalty(latency, pm: PreparedModel | None):
    """``(tensor, activation) -> units``: a 16-bit activation on ``tensor`` runs the int8 layers
    whose output QuantizeLinear it is unfused (:meth:`LatencyTable.unfused_ms`). Charged whatever
    those layers choose, so the knapsack's cost never underestimates (the plan's estimate charges
    only the layers that are int8)."""
    if pm is None:
        return None
    from .structure import output_producers

    producers = output_producers(pm)
    extra = {t: round(sum(latency.unfused_ms(n) for n in names if n in latency.costs) * LATENCY_UNITS_PER_MS)
             for t, names in producers.items()}

    def penalty(tensor: str, activation) -> int:
        return extra.get(tensor, 0) if activation is not None and activation.bits == 16 else 0

    return penalty


def unfused_layers(pm: PreparedModel, sources, weights, activations) -> list[str]:
    """The int8 layers of a plan onnxruntime runs unfused because a 16-bit activation follows them:
    ``weights``/``activations``: layer -> its weight / input activation setting; ``sources``: layer
    input -> the tensor whose QDQ it gets."""
    from .structure import output_producers

    producers = output_producers(pm)
    by_name = {layer.name: layer for layer in pm.layers}
    out: list[str] = []
    for name, act in activations.items():
        if act is None or act.bits != 16 or name not in by_name:
            continue
        tensor = by_name[name].input
        for p in producers.get(sources.get(tensor, tensor), ()):
            w, own = weights.get(p), activations.get(p)
            if w is not None and w.bits == 8 and not (own is not None and own.bits == 16):  # else charged already
                out.append(p)
    return list(dict.fromkeys(out))


def _latency_budget(budget: MaxLatency, latency):
    cost_latency, fixed = _latency_cost(latency)
    limit = int(math.floor(budget.limit_ms(latency.float_ms) * LATENCY_UNITS_PER_MS)) - fixed
    if limit < 0:
        raise PlanError(f"--max-latency {budget.describe()} is below the latency of the model outside its layers "
                        f"({latency.rest_ms:.4g} ms)")
    return cost_latency, limit, "x 0.1 us of latency", fixed


def _budget(scored: Scored, pm: PreparedModel, budget: Budget | None, latency=None):
    if isinstance(budget, MaxLatency):
        return _latency_budget(budget, latency)
    total = sum(int(np.prod(lt.layer.weight_shape)) for lt in scored.layers)
    if budget is None or isinstance(budget, AvgBits):

        def cost_of(lt: LayerTerms, s: WeightScore, activation=None) -> int:
            return s.cost_bits

        limit = None if budget is None else int(math.floor(budget.bits * total))
        return cost_of, limit, "weight bits", 0
    layer_w = {lt.layer.weight for lt in scored.layers}
    fixed = sum(
        int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        for t in pm.model.graph.initializer
        if t.name not in layer_w
    )

    def cost_bytes(lt: LayerTerms, s: WeightScore, activation=None) -> int:
        w = s.setting
        params = int(np.prod(lt.layer.weight_shape))
        scales = lt.layer.weight_shape[lt.layer.channel_axis] if w is not None and isinstance(w.granularity, PerChannel) else 1
        return weight_bytes(params, 32 if w is None else w.bits, scales)

    if budget.bytes - fixed < 0:
        raise PlanError(f"--max-bytes {budget.bytes} is below the size of the model's other constants ({fixed} bytes)")
    return cost_bytes, budget.bytes - fixed, "bytes of weights", fixed


def latency_floor_ms(scored: Scored, latency, pm: PreparedModel | None = None) -> float:
    """The additive estimate of the fastest plan these candidates allow (ms; with ``pm``, charging
    the int8 layers a 16-bit activation after them unfuses)."""
    cost_of, fixed = _latency_cost(latency)
    groups, _ = _groups(scored, cost_of, by_activation=True, penalty=_latency_penalty(latency, pm))
    return (sum(min(o.cost for o in g.options) for g in groups) + fixed) / LATENCY_UNITS_PER_MS


def choose(scored: Scored, pm: PreparedModel, budget: Budget | None = None, latency=None) -> Choice:
    """The settings minimising the summed metric, within ``budget`` (exact; PlanError if infeasible).
    ``latency``: the :class:`~laqonnx.quant.latency_costs.LatencyTable` a :class:`MaxLatency` budget is solved over."""
    cost_of, limit, unit, fixed = _budget(scored, pm, budget, latency)
    lat = isinstance(budget, MaxLatency)
    groups, members = _groups(scored, cost_of, by_activation=lat, penalty=_latency_penalty(latency, pm) if lat else None)
    try:
        sel = select(groups, limit, unit=unit)
    except PlanError as exc:
        floor = sum(min(o.cost for o in g.options) for g in groups)
        if isinstance(budget, AvgBits):
            total = sum(int(np.prod(lt.layer.weight_shape)) for lt in scored.layers)
            raise PlanError(
                f"--avg-weight-bits {budget.bits:g} is infeasible: the minimum achievable with these candidates "
                f"is {floor / total:.4g} bits"
            ) from exc
        if isinstance(budget, MaxLatency):
            raise PlanError(f"--max-latency {budget.describe()} is infeasible: the fastest plan with these candidates "
                            f"takes about {(floor + fixed) / LATENCY_UNITS_PER_MS:.4g} ms") from exc
        if isinstance(budget, MaxBytes):
            raise PlanError(f"--max-bytes {budget.bytes} is infeasible: the minimum achievable is about {floor + fixed} bytes") from exc
        raise
    weights: dict[str, int] = {}
    activations: dict[str, int] = {}
    for g, (tensor, names), pick in zip(groups, members, sel.choice):
        ai, key = g.options[pick].key
        activations[tensor] = ai
        for name, k in zip(names, key):
            weights[name] = k
    return Choice(weights, activations, sel.cost, sel.value)
