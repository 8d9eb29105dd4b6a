"""Adaptive rounding re-fitted in order on the quantized model's own inputs.

The metric fits each candidate's adaptive rounding on the *float* model's activations, one layer at
a time, before any plan exists (:mod:`laqonnx.quant.rounding`). Once a plan is chosen, the layers
upstream of an adaptive layer are quantized too, and the written model feeds it different inputs.
:func:`refit_rounding` walks the plan's adaptive layers in graph order and learns each rounding
again on the inputs the partly quantized model gives it (the layers before it already re-fitted),
against the float layer's output on the float inputs: the error the written model makes, so the
rounding also makes up for what the upstream quantization passes on (as Quark and AIMET fit theirs).
Each layer's new rounding starts from nearest and is never worse than nearest on those inputs.

The re-fit is kept only when the whole model's measured calibration loss (the guard's, clean and
adversarial, through onnxruntime) is not higher than with the independent roundings; the plan
records both losses and each layer's (nearest, adaptive) error on the quantized inputs.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import onnx

from ..graph import PreparedModel
from .metric import ObjectiveConfig
from .plan import Plan
from .rounding import AdaRoundConfig, adaptive_round
from .scoring import CalibSet, model_values

__all__ = ["Refit", "refit_rounding"]


@dataclass(frozen=True, eq=False)
class Refit:
    """The outcome: the plan (re-fitted when ``kept``), the layers re-fitted, both measured losses."""

    plan: Plan
    layers: tuple[str, ...]
    loss_independent: float
    loss_sequential: float
    kept: bool
    seconds: float

    def note(self) -> str:
        verdict = "kept" if self.kept else "not kept (the independent roundings measure lower)"
        return (f"adaptive rounding re-fitted in order on the quantized model's inputs ({len(self.layers)} layer(s), "
                f"{self.seconds:.1f} s): calibration loss {self.loss_independent:.4g} -> {self.loss_sequential:.4g}, {verdict}")


def _weight_initializer(model: onnx.ModelProto, node: onnx.NodeProto, weight_shape) -> tuple[int, onnx.TensorProto, bool] | None:
    """(input index, integer initializer, stored transposed) of the node's dequantized constant
    weight (a Gemm's weight is written transposed for the MatMul it is lowered to)."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for k, name in enumerate(node.input[:2]):
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        init = inits[dq.input[0]]
        if tuple(init.dims) == tuple(weight_shape):
            return k, init, False
        if len(weight_shape) == 2 and tuple(init.dims) == tuple(weight_shape)[::-1]:
            return k, init, True
    return None


def _set_integers(init: onnx.TensorProto, q: np.ndarray, transposed: bool) -> None:
    """Overwrite an integer initializer (int4 included: make_tensor packs it) with ``q``."""
    q = np.asarray(q).astype(np.int64)
    new = onnx.helper.make_tensor(init.name, init.data_type, list(init.dims), (q.T if transposed else q).ravel().tolist())
    init.CopyFrom(new)


def refit_rounding(pm: PreparedModel, plan: Plan, lowered: onnx.ModelProto, qparams, data: CalibSet, check: CalibSet,
                   config: ObjectiveConfig, adaround: AdaRoundConfig = AdaRoundConfig(), *, progress: bool = False):
    """Re-fit the adaptive layers of ``plan`` (lowered to ``lowered``, weight qparams ``qparams`` by
    weight name) on ``data`` in order; judged on ``check`` by the guard's loss. Returns
    ``(Refit, lowered model)`` (the model re-fitted when kept), or None without adaptive layers
    that the lowered graph holds as a dequantized constant weight."""
    from tqdm.auto import tqdm

    from .guard import guard

    t0 = time.perf_counter()
    by_name = {n.name: n for n in lowered.graph.node}
    todo = []
    for lp in plan.layers:
        if lp.chosen.weight is None or lp.chosen.weight.rounding != "adaptive" or lp.weight not in plan.rounded:
            continue
        layer = pm.layer(lp.name)
        node = by_name.get(lp.name)  # the lowering keeps node names (a Gemm becomes a MatMul of the same name)
        found = None if node is None else _weight_initializer(lowered, node, layer.weight_shape)
        if found is not None:  # (plan layer, layer, its input in the lowered graph, weight initializer, transposed)
            todo.append((lp, layer, node.input[1 - found[0]], found[1].name, found[2]))
    if not todo:
        return None
    x = data.clean if data.adversarial is None else np.concatenate([data.clean, data.adversarial])
    float_in = model_values(pm.model, pm.input_name, x, [layer.input for _, layer, *_ in todo], getattr(pm, "fixed_batch", None))
    work = copy.deepcopy(lowered)
    inits = {i.name: i for i in work.graph.initializer}
    rounded = dict(plan.rounded)
    errors: dict[str, tuple[float, float]] = {}
    bar = tqdm(total=len(todo), desc="adaptive rounding, in order", unit="layer", disable=not progress, leave=False)
    for lp, layer, act, init_name, transposed in todo:
        bar.set_postfix_str(layer.name[-24:])
        q_in = model_values(work, pm.input_name, x, [act], getattr(pm, "fixed_batch", None))[act]
        r = adaptive_round(layer, pm.weight(layer), qparams[lp.weight], q_in, adaround, target_inputs=float_in[layer.input])
        rounded[lp.weight] = r.q
        errors[lp.name] = (r.error_nearest, r.error_adaptive)
        _set_integers(inits[init_name], r.q, transposed)
        bar.update(1)
    bar.close()
    entries = {e.name: e.loss for e in guard({"independent": lowered, "sequential": work}, pm.model, pm.input_name,
                                            pm.output_name, check, config, getattr(pm, "fixed_batch", None))}
    kept = entries["sequential"] <= entries["independent"]
    new_plan = plan
    if kept:
        layers = tuple(dataclasses.replace(lp, rounding_error=errors.get(lp.name, lp.rounding_error)) for lp in plan.layers)
        new_plan = dataclasses.replace(plan, layers=layers, rounded=rounded)
    result = Refit(new_plan, tuple(lp.name for lp, *_ in todo), entries["independent"], entries["sequential"], kept,
                   time.perf_counter() - t0)
    return result, (work if kept else lowered)
