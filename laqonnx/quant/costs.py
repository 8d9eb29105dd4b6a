"""The cost model of a budget and the choice under it: per candidate its cost (weight bits, or
model bytes with the per-channel scales), one knapsack group per input tensor whose options are
Pareto-pruned per activation setting, and :func:`choose`, which solves it with
:func:`laqonnx.quant.select.select`."""

from __future__ import annotations

import math

import numpy as np
import onnx

from ..errors import PlanError
from ..graph import PreparedModel
from .metric import Scored
from .numerics import PerChannel
from .select import Group, Option, select

__all__ = ["choose"]


def _pareto(options: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    out: list[tuple[int, float, int]] = []
    for cost, value, idx in sorted(options, key=lambda t: (t[0], t[1], t[2])):
        if not out or value < out[-1][1]:
            out.append((cost, value, idx))
    return out


def _byte_cost(params: int, bits: int, scales: int) -> int:
    if bits == 32:
        return 4 * params
    return math.ceil(params * bits / 8) + scales * 5  # + float32 scale and int8 zero point each


def _groups(scored: Scored, cost_of) -> tuple[list[Group], list[list[str]]]:
    """One group per input tensor (its layers share one activation QDQ); options = (activation,
    per-layer weight choice), each layer's weight choices Pareto-pruned per activation (exact)."""
    by_input: dict[str, list[int]] = {}
    for i, lt in enumerate(scored.layers):
        by_input.setdefault(lt.layer.input, []).append(i)
    groups, members = [], []
    for tensor, idxs in by_input.items():
        acts = list(dict.fromkeys(s.candidate.activation for s in scored.layers[idxs[0]].scores))
        options = []
        for a in acts:
            fronts = []
            for i in idxs:
                lt = scored.layers[i]
                fronts.append(_pareto([(cost_of(lt, s), s.metric, k) for k, s in enumerate(lt.scores) if s.candidate.activation == a]))
            combos = [(0, 0.0, ())]
            for front in fronts:
                combos = [(c + fc, v + fv, key + (k,)) for c, v, key in combos for fc, fv, k in front]
            options += [Option(c, v, key) for c, v, key in combos]
        groups.append(Group(tensor, tuple(options)))
        members.append([scored.layers[i].layer.name for i in idxs])
    return groups, members


def choose(scored: Scored, pm: PreparedModel, avg_weight_bits: float | None, max_bytes: int | None) -> dict[str, int]:
    """layer name -> index of the chosen score."""
    if avg_weight_bits is not None:
        total = sum(int(np.prod(lt.layer.weight_shape)) for lt in scored.layers)
        budget, unit = int(math.floor(avg_weight_bits * total)), "weight bits"

        def cost_of(lt, s):
            return s.cost_bits
    elif max_bytes is not None:
        layer_w = {lt.layer.weight for lt in scored.layers}
        fixed = sum(
            int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            for t in pm.model.graph.initializer
            if t.name not in layer_w
        )
        budget, unit = int(max_bytes) - fixed, "bytes of weights"

        def cost_of(lt, s):
            w = s.candidate.weight
            params = int(np.prod(lt.layer.weight_shape))
            scales = lt.layer.weight_shape[lt.layer.channel_axis] if w is not None and isinstance(w.granularity, PerChannel) else 1
            return _byte_cost(params, s.candidate.weight_bits, scales)
    else:
        budget, unit = None, ""

        def cost_of(lt, s):
            return s.cost_bits
    groups, members = _groups(scored, cost_of)
    if budget is not None and budget < 0:
        raise PlanError(f"--max-bytes {max_bytes} is below the size of the model's other constants ({max_bytes - budget} bytes)")
    try:
        sel = select(groups, budget, unit=unit)
    except PlanError as exc:
        if avg_weight_bits is not None:
            total = sum(int(np.prod(lt.layer.weight_shape)) for lt in scored.layers)
            floor = sum(min(o.cost for o in g.options) for g in groups)
            raise PlanError(
                f"--avg-weight-bits {avg_weight_bits:g} is infeasible: the minimum achievable with these candidates "
                f"is {floor / total:.4g} bits"
            ) from exc
        if max_bytes is not None:
            floor = sum(min(o.cost for o in g.options) for g in groups) + (max_bytes - budget)
            raise PlanError(f"--max-bytes {max_bytes} is infeasible: the minimum achievable is about {floor} bytes") from exc
        raise
    chosen: dict[str, int] = {}
    for g, names, pick in zip(groups, members, sel.choice):
        for name, k in zip(names, g.options[pick].key):
            chosen[name] = k
    return chosen
