"""The ``quantize`` workflow: :func:`plan_model` then :func:`apply_plan`, or :func:`quantize` for both.

:func:`plan_model` (:mod:`.planning`) chooses the settings; :func:`apply_plan` lowers a plan through
onnxruntime's quantizer, **loads and runs the written model in onnxruntime** on calibration
examples (top-1 agreement with the float model is measured and recorded; a model onnxruntime
refuses is never written), and writes the QDQ model, its plan (``OUT.plan.json``) and, with
``baseline=``, onnxruntime's plain ``quantize_static`` model on the same calibration data
(``OUT.<baseline>.onnx``, checked the same way). Outputs are written atomically after everything
succeeded; the input model is never modified. The written model keeps the user's input and
outputs (names, batch size); it is the working copy of intake (opset >= 13, constants folded).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .._util.io import atomic_write_bytes, atomic_write_json, check_output_path, save_model
from ..errors import DataError, OptionError, PlanError
from ..graph import PreparedModel, load_model
from ..vocab import Baseline
from .adversarial import FromData, Generated, Off
from .costs import AvgBits, MaxBytes, MaxLatency, parse_max_latency
from .guard import OrtRunner, RobustGuard, logits_view
from .latency_check import NOISE_MARGIN, LatencyCheck, budget_note, check_latency, slower_note
from .lower import drop_unused_initializers, lower, ort_baseline, quantized_tensors
from .metric import CandidateSpace
from .numerics import PerChannel, PerTensor
from .plan import Plan, rounding_bytes
from .planning import QuantizeOptions, lowering_spec, model_sha256, plan_model

__all__ = ["quantize", "plan_model", "apply_plan", "QuantizeResult", "QuantizeOptions", "plan_path_for", "rounding_path_for",
           "INT4_NOTE",
           "AGREEMENT_WARNING"]

INT4_NOTE = (
    "int4 Conv weights are not fused by onnxruntime's CPU provider: int4 Conv layers run ~4x slower than int8 "
    "(int4 MatMul/Gemm layers are written for its fused MatMulNBits kernel)"
)
AGREEMENT_WARNING = 0.9  # below this top-1 agreement with the float model, the result warns loudly
_CHECK_EXAMPLES = 256


@dataclass(frozen=True)
class QuantizeResult:
    """What was written and measured."""

    output: Path
    plan_path: Path
    plan: Plan
    avg_weight_bits: float  # parameter-weighted over the weighted layers, float counted as 32
    size_bytes: int  # the written model file
    float_size_bytes: int  # the float model, serialized
    agreement: float | None = None  # top-1 agreement with the float model on calibration examples (onnxruntime)
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per stage
    baseline_output: Path | None = None
    baseline_agreement: float | None = None
    warnings: tuple[str, ...] = ()
    latency: LatencyCheck | None = None  # batch-1 float vs written model, with latency_check

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "plan": str(self.plan_path),
            "baseline_output": None if self.baseline_output is None else str(self.baseline_output),
            "avg_weight_bits": self.avg_weight_bits,
            "size_bytes": self.size_bytes,
            "float_size_bytes": self.float_size_bytes,
            "agreement": self.agreement,
            "baseline_agreement": self.baseline_agreement,
            "guard": None if self.plan.guard is None else self.plan.guard.to_json(),
            "timings": dict(self.timings),
            "warnings": list(self.warnings),
            "latency": None if self.latency is None else self.latency.to_json(),
            "layers": [
                {"name": lp.name, "weight": lp.chosen.describe()[0], "activation": lp.chosen.describe()[1]}
                for lp in self.plan.layers
            ],
        }


def plan_path_for(output: str | os.PathLike[str]) -> Path:
    """``model.int8.onnx`` -> ``model.int8.plan.json``."""
    out = Path(output)
    return out.with_name((out.stem if out.suffix == ".onnx" else out.name) + ".plan.json")


def rounding_path_for(output: str | os.PathLike[str]) -> Path:
    """``model.int8.onnx`` -> ``model.int8.rounding.npz`` (the adaptive layers' integer weights)."""
    out = Path(output)
    return out.with_name((out.stem if out.suffix == ".onnx" else out.name) + ".rounding.npz")


def _baseline_path(output: Path, baseline: str) -> Path:
    return output.with_name((output.stem if output.suffix == ".onnx" else output.name) + f".{baseline}.onnx")


def _model_bytes(model: Any) -> bytes:
    if isinstance(model, PreparedModel):
        return model.model.SerializeToString()
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    try:
        return Path(model).read_bytes()
    except OSError:
        return b""  # load_model reports the missing/unreadable model with a ModelError


def _check(pm: PreparedModel, qmodel: onnx.ModelProto, x: np.ndarray | None, what: str) -> float | None:
    """Load ``qmodel`` in onnxruntime and run it (raises ModelError if it cannot); top-1 agreement
    with the float model on ``x`` (None without data: then it runs once on zeros)."""
    fixed = getattr(pm, "fixed_batch", None)
    try:
        run = OrtRunner(logits_view(qmodel, pm.output_name), pm.input_name, fixed)
    except Exception as exc:
        raise type(exc)(f"the {what} does not load in onnxruntime, so it was not written: {exc}") from exc
    if x is None or not len(x):
        dtype = np.dtype(getattr(pm, "input_dtype", np.float32))
        run(np.zeros((fixed or 1, *pm.input_shape[1:]), dtype=dtype))
        return None
    ref = OrtRunner(logits_view(pm.model, pm.output_name), pm.input_name, fixed)
    x = x[:_CHECK_EXAMPLES]
    return float(np.mean(run(x).argmax(1) == ref(x).argmax(1)))


def _agreement_note(agreement: float | None, what: str) -> list[str]:
    if agreement is None or agreement >= AGREEMENT_WARNING:
        return []
    return [f"WARNING: the {what} agrees with the float model on only {agreement:.1%} of the calibration examples "
            f"(top-1, onnxruntime): check the plan (a budget too tight, a layer that needs more bits)"]


def _write(pm: PreparedModel, plan: Plan, qmodel: onnx.ModelProto, out: Path, protect: list, x: np.ndarray | None,
           baseline: str | None, per_channel: bool, warnings: list[str], timings: dict[str, float],
           latency_check: bool = False, latency_budget: MaxLatency | None = None) -> QuantizeResult:
    t = time.perf_counter()
    drop_unused_initializers(qmodel)
    agreement = _check(pm, qmodel, x, "quantized model")
    plan = dataclasses.replace(plan, check=None if agreement is None else {"agreement": agreement, "examples": int(min(len(x), _CHECK_EXAMPLES))})
    warnings += _agreement_note(agreement, "quantized model")
    base_model, base_agreement = None, None
    if baseline is not None:
        if x is None:
            raise DataError("--baseline needs calibration data (--calib)")
        fixed = getattr(pm, "fixed_batch", None) or 32
        base_model = ort_baseline(pm.model, pm.input_name, [x[i:i + fixed] for i in range(0, len(x), fixed)],
                                  method=baseline, per_channel=per_channel)
        drop_unused_initializers(base_model)
        base_agreement = _check(pm, base_model, x, f"onnxruntime {baseline} model")
        warnings += _agreement_note(base_agreement, f"onnxruntime {baseline} model")
    int4 = [lp.name for lp in plan.layers if lp.chosen.weight is not None and lp.chosen.weight.bits == 4
            and lp.op_type not in ("MatMul", "Gemm")]
    if int4:
        warnings.append(f"{INT4_NOTE} ({len(int4)} int4 Conv layer(s): {', '.join(int4)})")
    timings["check"] = time.perf_counter() - t
    latency = None
    if latency_check or latency_budget is not None:
        t = time.perf_counter()
        batch = 1 if latency_budget is None else latency_budget.batch
        latency = check_latency(pm.model, qmodel, pm.input_shape[1:], batch=getattr(pm, "fixed_batch", None) or batch)
        notes = [slower_note(latency), None if latency_budget is None else budget_note(latency, latency_budget)]
        for note in (n for n in notes if n is not None):
            warnings.append(note)
            plan = dataclasses.replace(plan, warnings=tuple(dict.fromkeys([*plan.warnings, note])))
        if latency_budget is not None:
            measured = {"measured_ms": latency.quantized_ms, "float_measured_ms": latency.float_ms,
                        "within": latency.quantized_ms <= latency_budget.limit_ms(latency.float_ms) * NOISE_MARGIN}
            plan = dataclasses.replace(plan, latency={**(plan.latency or {}), **measured})
        timings["latency"] = time.perf_counter() - t
    t = time.perf_counter()
    plan_out = plan_path_for(out)
    rounding_out = None
    adaptive = {lp.weight for lp in plan.layers if lp.chosen.weight is not None and lp.chosen.weight.rounding == "adaptive"}
    if adaptive:
        rounding_out = rounding_path_for(out)
        plan = dataclasses.replace(plan, rounding_file=rounding_out.name,
                                   rounded={k: v for k, v in plan.rounded.items() if k in adaptive})
    else:
        plan = dataclasses.replace(plan, rounding_file=None, rounded={})
    save_model(qmodel, out, *protect)
    if rounding_out is not None:
        atomic_write_bytes(rounding_out, rounding_bytes(plan.rounded))
    atomic_write_json(plan_out, plan.to_json())
    base_out = None
    if base_model is not None:
        base_out = save_model(base_model, _baseline_path(out, baseline), *protect)
    timings["write"] = time.perf_counter() - t
    return QuantizeResult(
        output=out, plan_path=plan_out, plan=plan, avg_weight_bits=plan.avg_bits, size_bytes=out.stat().st_size,
        float_size_bytes=pm.model.ByteSize(), agreement=agreement, timings=timings, baseline_output=base_out,
        baseline_agreement=base_agreement, warnings=tuple(dict.fromkeys(warnings)), latency=latency,
    )


def apply_plan(
    model: Any,
    plan: str | os.PathLike[str] | Plan,
    output: str | os.PathLike[str],
    calib: Any = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    output_name: str | None = None,
    input_range: tuple[float, float] | None = None,
    calib_limit: int | None = None,
    baseline: str | None = None,
    per_channel: bool = False,
    progress: bool = True,
    latency_check: bool = False,
) -> QuantizeResult:
    """Lower a (possibly edited) plan for ``model`` and write it (see the module doc). With ``calib``
    the activation ranges are recomputed from it with each tensor's setting, else the plan's stored
    ranges are used (a layer whose activation setting was edited then needs ``calib``)."""
    t0 = time.perf_counter()
    protect = [None if isinstance(model, (onnx.ModelProto, PreparedModel)) else model,
               None if isinstance(plan, Plan) else plan]
    out = check_output_path(output, *protect)
    check_output_path(plan_path_for(out), *protect)
    check_output_path(rounding_path_for(out), *protect)
    if baseline is not None:
        check_output_path(_baseline_path(out, Baseline.check(baseline, "baseline")), *protect)
    raw = _model_bytes(model)
    pm = model if isinstance(model, PreparedModel) else load_model(model, input_shape, allow_quantized=False, output=output_name)
    the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    the_plan.validate(pm.layers, model_sha256(raw))
    tensors = quantized_tensors(pm.model)
    timings = {"load": time.perf_counter() - t0}
    x = None
    warnings = list(the_plan.warnings)
    if calib is not None:
        from .calibration import calibrate

        t = time.perf_counter()
        calibration = calibrate(pm, calib, tensors, adversarial=Off(), input_range=input_range or the_plan.input_range,
                                limit=calib_limit, progress=progress)
        x = calibration.data.clean
        spec = {lp.activation_source: lp.chosen.activation for lp in the_plan.layers}
        from .ranges import activation_range
        from .plan import TensorRange

        ranges = []
        for r in the_plan.ranges:
            a = spec.get(r.tensor, r.activation)
            if r.tensor in calibration.stats:
                lo, hi = activation_range(calibration.stats[r.tensor], a)
                ranges.append(TensorRange(r.tensor, a, float(lo), float(hi), r.scores))
        stored = {r.tensor for r in ranges}
        for tname in tensors:
            if tname not in stored and tname in calibration.stats:
                lo, hi = activation_range(calibration.stats[tname], spec.get(tname, CandidateSpace().default_activation))
                ranges.append(TensorRange(tname, spec.get(tname, CandidateSpace().default_activation), float(lo), float(hi)))
        the_plan = dataclasses.replace(the_plan, ranges=tuple(ranges))
        timings["calibrate"] = time.perf_counter() - t
    else:
        _check_stored_ranges(the_plan, tensors)
    t = time.perf_counter()
    the_plan, spec = lowering_spec(pm, the_plan)
    qmodel = lower(pm.model, spec)
    timings["lower"] = time.perf_counter() - t
    result = _write(pm, the_plan, qmodel, out, protect, x, baseline, per_channel, warnings, timings, latency_check)
    timings["total"] = time.perf_counter() - t0
    return result


def _check_stored_ranges(plan: Plan, tensors: list[str]) -> None:
    rng = plan.range_map()
    missing = [t for t in tensors if t not in rng]
    if missing:
        raise PlanError(f"the plan has no activation range for {', '.join(missing[:5])}: re-apply it with --calib")
    for lp in plan.layers:
        if rng[lp.activation_source].activation != lp.chosen.activation:
            raise PlanError(
                f"layer {lp.name}: its activation setting was edited, so the stored range of {lp.activation_source!r} is stale: "
                "re-apply the plan with --calib to recompute ranges"
            )


def _adversarial(adversarial_calib: Any):
    if adversarial_calib is None or adversarial_calib is True:
        return Generated()
    if adversarial_calib is False:
        return Off()
    if isinstance(adversarial_calib, (Generated, FromData, Off)):
        return adversarial_calib
    return FromData(adversarial_calib)


def quantize(
    model: Any,
    output: str | os.PathLike[str],
    calib: Any = None,
    *,
    eps: float = 8 / 255,
    norm: str = "inf",
    objective: str = "laq",
    avg_weight_bits: float | None = None,
    max_bytes: int | None = None,
    adversarial_calib: Any = None,
    plan: str | os.PathLike[str] | Plan | None = None,
    baseline: str | None = None,
    per_channel: bool | None = None,
    input_shape: tuple[int, ...] | None = None,
    output_name: str | None = None,
    input_range: tuple[float, float] | None = None,
    calib_limit: int | None = None,
    allow_float: bool = False,
    guard: bool | RobustGuard = True,
    metric_examples: int = 64,
    rounding: str | None = None,
    progress: bool = True,
    candidates: CandidateSpace | None = None,
    latency_check: bool = False,
    max_latency: str | MaxLatency | None = None,
    latency_batch: int = 1,
    latency_table: Any = None,
    reduce_range: bool | None = None,
) -> QuantizeResult:
    """Quantize ``model`` (a path or ``onnx.ModelProto``) to a QDQ model at ``output``.

    ``calib``: a data spec (``"digits"``, ``"mnist"``, ``.npz``, image folder, CIFAR batches) or
    arrays, in the model's units. ``eps``/``norm``: the threat model, in input units.
    ``adversarial_calib``: None or True (default: PGD examples on the float model when eps > 0),
    False (clean only), or a data spec of adversarial examples paired with ``calib``. Budgets:
    ``avg_weight_bits`` or ``max_bytes`` (at most one). ``per_channel``: None scores both
    granularities, True/False only one (and sets the baseline's). ``plan``: re-apply a (possibly
    edited) plan instead (see :func:`apply_plan`). ``guard``: compare with the ablations and the uniform
    rule and keep the best measured (a :class:`RobustGuard`: the most robust under PGD). ``rounding``: ``auto`` (default: adaptive rounding
    is a candidate of the int4 per-channel MSE settings), ``nearest`` or ``adaptive`` (forced on
    every layer). ``latency_check``: after writing, time the float and the written model (batch 1,
    interleaved, < 1 s on small models) and warn if the quantized one is slower. ``max_latency``:
    a latency budget, ``"0.7x"`` (of the float model) or ``"3.5ms"`` or a :class:`MaxLatency`, at
    ``latency_batch``, solved over per-layer costs measured by onnxruntime's profiler (cached;
    ``latency_table`` to give them); the written model is then measured against it.
    ``reduce_range``: int8 weights in 7 bits ([-64, 63]); None (default): on when this CPU is x86
    without VNNI/AMX, where onnxruntime's int8 kernels saturate full-range weights (kept as given by
    ``candidates``). See
    :mod:`laqonnx.quant.metric` for the metric.
    """
    if sum(b is not None for b in (avg_weight_bits, max_bytes, max_latency)) > 1:
        raise OptionError("give at most one budget: avg_weight_bits, max_bytes or max_latency")
    if isinstance(max_latency, str):
        max_latency = parse_max_latency(max_latency, latency_batch)
    budget = (AvgBits(avg_weight_bits) if avg_weight_bits is not None else MaxBytes(max_bytes) if max_bytes is not None
              else max_latency)
    if plan is not None:
        if budget is not None:
            raise PlanError("a budget does not apply when re-applying a plan (--plan): edit the plan's settings instead")
        if candidates is not None or rounding is not None or reduce_range is not None:
            raise PlanError("candidate sets (--weight-methods/--activation-methods, --rounding, --reduce-range) choose what to score; they do not "
                            "apply when re-applying a plan (--plan): edit the plan's settings instead")
        return apply_plan(model, plan, output, calib, input_shape=input_shape, output_name=output_name,
                          input_range=input_range, calib_limit=calib_limit, baseline=baseline,
                          per_channel=bool(per_channel), progress=progress, latency_check=latency_check)
    if calib is None:
        raise DataError("calibration data is required (--calib), unless re-applying a plan with --plan")
    if baseline is not None:
        Baseline.check(baseline, "baseline")
    space = candidates or CandidateSpace(allow_float=allow_float)
    if per_channel is not None:
        space = dataclasses.replace(space, granularities=(PerChannel(),) if per_channel else (PerTensor(),))
    if (allow_float or isinstance(budget, MaxLatency)) and not space.allow_float:
        space = dataclasses.replace(space, allow_float=True)  # under a latency budget float is a fallback, often the fastest
    if (isinstance(budget, MaxLatency) and candidates is None and 16 not in space.activation_bits
            and (latency_table is None or all("a16" in per for per in latency_table.costs.values()))):
        # and 16-bit activations a fallback that buys precision where the metric says it matters, at their measured cost
        space = dataclasses.replace(space, activation_bits=(*space.activation_bits, 16))
    if rounding is not None:
        space = dataclasses.replace(space, rounding=rounding)
    if reduce_range is not None or candidates is None:
        from ..latency import cpu_info

        space = dataclasses.replace(space, reduce_range=bool(cpu_info().int8_saturates() if reduce_range is None else reduce_range))
    options = QuantizeOptions(eps=float(eps), norm=str(norm), objective=objective, budget=budget,
                              adversarial=_adversarial(adversarial_calib), candidates=space, input_range=input_range,
                              calib_limit=calib_limit, metric_examples=metric_examples, guard=guard,
                              latency_table=latency_table)
    t0 = time.perf_counter()
    protect = [None if isinstance(model, onnx.ModelProto) else model]
    out = check_output_path(output, *protect)
    check_output_path(plan_path_for(out), *protect)
    check_output_path(rounding_path_for(out), *protect)
    if baseline is not None:
        check_output_path(_baseline_path(out, baseline), *protect)
    raw = _model_bytes(model)
    pm = load_model(model, input_shape, allow_quantized=False, output=output_name)
    timings = {"load": time.perf_counter() - t0}
    planned = plan_model(pm, calib, options, sha256=model_sha256(raw), progress=progress)
    timings.update(planned.timings)
    x = planned.calibration.data.clean
    result = _write(pm, planned.plan, planned.lowered, out, protect, x, baseline, bool(per_channel), list(planned.plan.warnings),
                    timings, latency_check, budget if isinstance(budget, MaxLatency) else None)
    timings["total"] = time.perf_counter() - t0
    return result
