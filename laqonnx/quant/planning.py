"""``plan_model``: calibrate, score every candidate, choose under the budget, guard, and return a Plan.

The stages, in order: calibration (:mod:`.calibration`: the data in the model's units, adversarial
examples, statistics), scoring (:mod:`.scoring`: the metric's terms of every candidate), selection
(:mod:`.costs`: the exact knapsack under the budget), and the guard (:mod:`.guard`: the chosen plan
against the two ablations' plans and the uniform rule at the same budget, measured through
onnxruntime; the best is kept). Nothing is written here: :func:`laqonnx.quant.workflow.apply_plan`
lowers and writes a plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .._util.eps import large_eps_note
from ..errors import OptionError
from ..graph import PreparedModel
from ..vocab import Objective
from .adversarial import AdversarialCalib, Generated, Off
from .calibration import Calibration, calibrate
from .costs import AvgBits, Budget, Choice, MaxBytes, MaxLatency, choose, weight_bytes
from .int8_range import range_notes
from .latency_costs import LatencyTable, int4_dominated, table_for
from .guard import RobustGuard, guard_plans, uniform_choice
from .lower import LoweringSpec, lower, quantized_tensors
from .metric import Candidate, CandidateSpace, ObjectiveConfig, Scored
from .numerics import PerChannel
from .plan import LayerPlan, Plan, TensorRange
from .ranges import activation_range
from .scoring import score_layers

__all__ = ["QuantizeOptions", "Planned", "plan_model", "build_plan", "lowering_spec", "model_sha256"]


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything that decides a plan. ``input_range`` None: [0, 1] if the calibration data lie in
    it, else their own range; ``calib_limit`` None: at most 1024 examples; ``guard``: compare the
    chosen plan with its alternatives through onnxruntime and keep the best (a
    :class:`~laqonnx.quant.guard.RobustGuard`: the most robust under PGD on each one's mirror)."""

    eps: float = 8 / 255
    norm: str = "inf"
    objective: str = "laq"
    budget: Budget | None = None
    adversarial: AdversarialCalib = field(default_factory=Generated)
    candidates: CandidateSpace = field(default_factory=CandidateSpace)
    input_range: tuple[float, float] | None = None
    calib_limit: int | None = None
    metric_examples: int = 64
    projections: int | None = None
    adversarial_weight: float = 1.0
    guard: bool | RobustGuard = True
    seed: int = 0
    latency_table: LatencyTable | None = None  # per-layer costs for a MaxLatency budget (None: measured, cached)

    def __post_init__(self) -> None:
        self.objective_config()  # validates eps, norm, objective, weights, examples
        if self.budget is not None and not isinstance(self.budget, (AvgBits, MaxBytes, MaxLatency)):
            raise OptionError(f"budget must be AvgBits(bits), MaxBytes(bytes), MaxLatency(ms|relative) or None, got {self.budget!r}")
        if self.input_range is not None:
            lo, hi = (float(v) for v in self.input_range)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise OptionError(f"input_range must be finite with LO < HI, got {self.input_range!r}")
        if self.calib_limit is not None and (isinstance(self.calib_limit, bool) or not isinstance(self.calib_limit, int)
                                             or self.calib_limit < 1):
            raise OptionError(f"calib_limit must be a positive int, got {self.calib_limit!r}")

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(objective=self.objective, eps=self.eps, norm=self.norm,
                               adversarial_weight=self.adversarial_weight, metric_examples=self.metric_examples,
                               projections=self.projections, seed=self.seed)


@dataclass(frozen=True, eq=False)
class Planned:
    """A plan with what made it: the prepared model, the calibration and the lowered kept model."""

    plan: Plan
    pm: PreparedModel
    calibration: Calibration
    lowered: onnx.ModelProto
    qparams: Mapping[str, Any]
    scored: Scored | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def model_sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _layer_plans(scored: Scored, choice: Choice) -> tuple[tuple[LayerPlan, ...], dict[str, np.ndarray]]:
    """The layers of a choice, and the integer weights of its adaptive-rounding layers."""
    out, rounded = [], {}
    for lt in scored.layers:
        layer = lt.layer
        w = lt.scores[choice.weights[layer.name]].setting
        source = scored.source(layer.input)
        a = scored.tensors[source][choice.activations[source]].setting
        err = None
        if w is not None and w in lt.rounded:
            r = lt.rounded[w]
            err, rounded[layer.weight] = (r.error_nearest, r.error_adaptive), r.q
        out.append(LayerPlan(layer.name, layer.op_type, layer.weight, layer.input, int(np.prod(layer.weight_shape)),
                             layer.channel_axis, Candidate(w, a), lt.scores, rounding_error=err,
                             activation_tensor=None if source == layer.input else source))
    return tuple(out), rounded


def _ranges(calibration: Calibration, layers: tuple[LayerPlan, ...], tensors: list[str], default, scored: Scored | None):
    spec = {lp.activation_source: lp.chosen.activation for lp in layers}
    out = []
    for t in tensors:
        if t not in calibration.stats:
            continue
        a = spec.get(t, default)
        lo, hi = activation_range(calibration.stats[t], a)
        scores = scored.tensors.get(t, ()) if scored is not None else ()
        out.append(TensorRange(t, a, float(lo), float(hi), scores))
    return tuple(out)


def build_plan(pm: PreparedModel, scored: Scored, calibration: Calibration, choice: Choice, space: CandidateSpace,
               **settings: Any) -> tuple[Plan, onnx.ModelProto, dict]:
    """The plan of ``choice`` (``settings``: the Plan's other fields), its lowered model and weight qparams."""
    tensors = quantized_tensors(pm.model)
    layers, rounded = _layer_plans(scored, choice)
    defaults = {"model_sha256": "", "input_name": pm.input_name, "input_shape": tuple(pm.input_shape)}
    plan = Plan(layers=layers, ranges=_ranges(calibration, layers, tensors, space.default_activation, scored),
                rounded=rounded, **{**defaults, **settings})
    plan, spec = lowering_spec(pm, plan, {lt.layer.name: lt.qparams for lt in scored.layers})
    return plan, lower(pm.model, spec), dict(spec.weights)


def lowering_spec(pm: PreparedModel, plan: Plan, known: Mapping[str, Mapping[Any, Any]] | None = None):
    """The plan with its weight scales filled in, and the :class:`LoweringSpec` that writes it."""
    from .numerics import weight_qparams

    from .numerics import dequantize, fake_quant

    qps: dict[str, Any] = {}
    values: dict[str, np.ndarray] = {}
    layers = []
    for lp in plan.layers:
        w = lp.chosen.weight
        if w is None:
            layers.append(dataclasses.replace(lp, weight_scale=None, weight_zero_point=None))
            continue
        qp = (known or {}).get(lp.name, {}).get(w)
        if qp is None:
            qp = weight_qparams(pm.weight(pm.layer(lp.name)), w.nearest)
        qps[lp.weight] = qp
        if w.rounding == "adaptive":
            values[lp.weight] = dequantize(_adaptive_integers(pm, plan, lp, qp), qp)
        elif qp.reduce_range:  # onnxruntime's quantizer saturates at int8's range: hand it the 7-bit values
            values[lp.weight] = fake_quant(pm.weight(pm.layer(lp.name)), qp)
        layers.append(dataclasses.replace(lp, weight_scale=tuple(float(s) for s in np.ravel(qp.scale)),
                                          weight_zero_point=tuple(int(z) for z in np.ravel(qp.zero_point))))
    plan = dataclasses.replace(plan, layers=tuple(layers))
    rng = plan.range_map()
    spec = LoweringSpec(
        weights=qps,
        ranges={k: (r.rmin, r.rmax) for k, r in rng.items()},
        activations={k: r.activation for k, r in rng.items() if r.activation.bits != 8 or r.activation.symmetric},
        exclude=tuple(lp.name for lp in plan.layers if lp.chosen.weight is None),
        values=values,
    )
    return plan, spec


def _adaptive_integers(pm: PreparedModel, plan: Plan, lp: LayerPlan, qp) -> np.ndarray:
    """The learned integer weights of an adaptive layer, checked against its weight and scale."""
    from ..errors import PlanError
    from .numerics import quantize

    q = plan.rounded.get(lp.weight)
    if q is None:
        raise PlanError(f"layer {lp.name} is set to adaptive rounding, but the plan has no learned integer weights for it: "
                        "re-run quantize (or keep the plan's rounding file beside it)")
    w = pm.weight(pm.layer(lp.name))
    q = np.asarray(q)
    if q.shape != w.shape:
        raise PlanError(f"layer {lp.name}: the rounding file's weights have shape {q.shape}, the model's {w.shape}")
    nearest = quantize(w, qp).astype(np.int64)
    if np.abs(q.astype(np.int64) - nearest).max(initial=0) > 1:
        raise PlanError(f"layer {lp.name}: the rounding file's integers are more than one step from the weight's nearest "
                        "rounding (another model, or an edited scale): re-run quantize")
    return q.astype(qp.storage_dtype)


def _fits(scored: Scored, pm: PreparedModel, budget: Budget | None, latency: LatencyTable | None = None):
    if isinstance(budget, MaxLatency):
        by = {lt.layer.name: lt for lt in scored.layers}
        limit = budget.limit_ms(latency.float_ms)
        return lambda weights: latency.total_ms({n: by[n].scores[k].setting for n, k in weights.items()}) <= limit  # 8-bit activations
    params = {lt.layer.name: int(np.prod(lt.layer.weight_shape)) for lt in scored.layers}
    total = sum(params.values())
    by_name = {lt.layer.name: lt for lt in scored.layers}
    if budget is None:
        return lambda weights: True
    if isinstance(budget, AvgBits):
        limit = int(np.floor(budget.bits * total))
        return lambda weights: sum(by_name[n].scores[k].cost_bits for n, k in weights.items()) <= limit
    layer_w = {lt.layer.weight for lt in scored.layers}
    fixed = sum(int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
                for t in pm.model.graph.initializer if t.name not in layer_w)

    def size(n: str, k: int) -> int:
        lt, s = by_name[n], by_name[n].scores[k]
        w = s.setting
        scales = lt.layer.weight_shape[lt.layer.channel_axis] if w is not None and isinstance(w.granularity, PerChannel) else 1
        return weight_bytes(params[n], 32 if w is None else w.bits, scales)

    return lambda weights: fixed + sum(size(n, k) for n, k in weights.items()) <= budget.bytes


LATENCY_ATTEMPTS = 4


def _estimate_ms(table: LatencyTable, plan: Plan, pm: PreparedModel, scored: Scored) -> float:
    """The table's additive latency estimate of ``plan``'s chosen settings, charging the int8 layers
    a 16-bit activation after them runs unfused."""
    from .costs import unfused_layers

    weights = {lp.name: lp.chosen.weight for lp in plan.layers}
    acts = {lp.name: lp.chosen.activation for lp in plan.layers}
    return table.total_ms(weights, acts, unfused_layers(pm, scored.sources, weights, acts))


def _fit_latency(pm: PreparedModel, scored: Scored, calibration, space, table: LatencyTable, budget: MaxLatency,
                 objective: str) -> tuple[MaxLatency, list[dict]]:
    """The budget to solve with so the *written* model meets ``budget``: the plan is lowered and timed
    against the float model (interleaved); while it misses, the solved limit shrinks by the measured
    overshoot (at most :data:`LATENCY_ATTEMPTS` plans). Returns the last target and every attempt."""
    from .costs import latency_floor_ms
    from .latency_check import NOISE_MARGIN, check_latency

    target, attempts = budget, []
    batch = getattr(pm, "fixed_batch", None) or budget.batch
    floor = latency_floor_ms(scored, table, pm) * (1 + 1e-6)
    for _ in range(LATENCY_ATTEMPTS):
        choice = choose(scored, pm, target, table)  # PlanError on the user's budget: infeasible as estimated
        plan, lowered, _ = build_plan(pm, scored, calibration, choice, space, objective=objective)
        chk = check_latency(pm.model, lowered, pm.input_shape[1:], batch=batch)
        limit = budget.limit_ms(chk.float_ms)
        solved = target.limit_ms(table.float_ms)
        attempts.append({"solved_ms": solved, "estimate_ms": _estimate_ms(table, plan, pm, scored), "measured_ms": chk.quantized_ms,
                         "float_measured_ms": chk.float_ms})
        if chk.quantized_ms <= limit * NOISE_MARGIN:
            return target, attempts
        if solved <= floor:
            break  # the fastest plan as estimated already: nothing faster to solve for
        target = MaxLatency(ms=max(floor, solved * limit / chk.quantized_ms * 0.97), batch=budget.batch)
    best = min(attempts, key=lambda a: a["measured_ms"] / a["float_measured_ms"])  # none met it: the fastest measured
    return MaxLatency(ms=best["solved_ms"], batch=budget.batch), attempts


def plan_model(
    pm: PreparedModel,
    calib: Any,
    options: QuantizeOptions = QuantizeOptions(),
    *,
    sha256: str = "",
    progress: bool = True,
) -> Planned:
    """Choose every layer's settings for ``pm`` (a :func:`laqonnx.graph.load_model` result) with the
    metric, under ``options.budget``; guarded. ``calib``: a data spec or arrays in the model's units."""
    timings: dict[str, float] = {}
    config = options.objective_config()
    space = options.candidates
    tensors = quantized_tensors(pm.model)
    from .structure import activation_sources

    sources = activation_sources(pm, tensors)
    needed = set(sources.values())
    cheap = [t for t in tensors if t not in needed] if space.default_activation.method == "minmax" else []
    mirror = None
    adversarial = options.adversarial if options.eps > 0 else Off()
    needs_torch = True
    try:
        import torch  # noqa: F401
    except ImportError:
        needs_torch = False
    t = time.perf_counter()
    if needs_torch:
        from .sensitivity import logits_mirror

        mirror = logits_mirror(pm)
    timings["mirror"] = time.perf_counter() - t
    calibration = calibrate(pm, calib, tensors, adversarial=adversarial, eps=options.eps, norm=options.norm,
                            input_range=options.input_range, limit=options.calib_limit,
                            adversarial_examples=options.metric_examples, minmax_only=cheap, mirror=mirror, progress=progress)
    timings.update({f"calibrate_{k}": v for k, v in calibration.seconds.items()})
    budgeted = options.budget is not None or 8 not in space.weight_bits  # without a budget: int8 (or what is allowed)
    bits = tuple(space.weight_bits) + ((32,) if space.allow_float else ()) if budgeted else (8,)
    table = None
    if isinstance(options.budget, MaxLatency):
        t = time.perf_counter()
        table = options.latency_table or table_for(pm, calibration.stats, bits, space.default_activation,
                                                   batch=options.budget.batch, activation_bits=space.activation_bits)
        timings["latency_costs"] = time.perf_counter() - t
    t = time.perf_counter()
    scored = score_layers(pm, calibration.stats, config, space, calibration.data, weight_bits=bits, mirror=mirror,
                          sources=sources, progress=progress, drop=int4_dominated(pm, table) if table is not None else ())
    timings["score"] = time.perf_counter() - t
    t = time.perf_counter()
    target, attempts = options.budget, []
    if table is not None:  # the additive estimate misses QDQ/layout transitions: measure, tighten, re-solve
        target, attempts = _fit_latency(pm, scored, calibration, space, table, options.budget, config.objective)
    choices: dict[str, Choice] = {config.objective: choose(scored, pm, target, table)}
    if options.guard:
        for other in (Objective.LAQ, Objective.MSE, Objective.LIPSCHITZ):
            name = str(other)
            if name not in choices and (scored.adversarial or name == Objective.MSE):
                choices[name] = choose(scored.rescored(config, name), pm, target, table)
        uniform = uniform_choice(scored, _fits(scored, pm, options.budget, table))
        if uniform is not None:
            choices["uniform"] = Choice(uniform[0], uniform[1], 0, 0.0)
    timings["select"] = time.perf_counter() - t

    budget = options.budget
    base = dict(
        model_sha256=sha256, input_name=pm.input_name, input_shape=tuple(pm.input_shape), objective=config.objective,
        eps=config.eps, norm=config.norm, input_range=calibration.input_range,
        avg_weight_bits=budget.bits if isinstance(budget, AvgBits) else None,
        max_bytes=budget.bytes if isinstance(budget, MaxBytes) else None,
        max_latency=({"ms": budget.ms} if budget.ms is not None else {"relative": budget.relative}) | {"batch": budget.batch}
        if isinstance(budget, MaxLatency) else None,
        adversarial_calib=calibration.adversarial, activation_stats=calibration.label,
        metric={"engine": scored.engine, "examples": scored.examples, "projections": scored.projections,
                "exact": scored.exact, "adversarial_weight": config.adversarial_weight},
        warnings=tuple(w for w in (large_eps_note(config.eps, config.norm, calibration.input_range), *scored.warnings)
                       if w is not None),
    )
    t = time.perf_counter()
    built: dict[str, tuple[Plan, onnx.ModelProto, dict]] = {}
    seen: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for name, choice in choices.items():
        key = (tuple(sorted(choice.weights.items())), tuple(sorted(choice.activations.items())))
        if key in seen:  # the same settings as an earlier alternative: measured once
            alias[name] = seen[key]
            continue
        seen[key] = name
        built[name] = build_plan(pm, scored, calibration, choice, space, **base)
    timings["lower"] = time.perf_counter() - t
    kept = config.objective
    if options.guard and len(built) > 1:
        t = time.perf_counter()
        rg = options.guard if isinstance(options.guard, RobustGuard) and config.eps > 0 else None
        if rg is not None and not needs_torch:
            raise OptionError("the robust guard attacks each plan's mirror: it needs torch (pip install 'laqonnx[robustness]')")
        result = guard_plans({n: b[1] for n, b in built.items()}, alias, pm, calibration, config,
                             options.metric_examples, rg)
        kept = result.kept
        timings["guard"] = time.perf_counter() - t
    else:
        result = None
    plan, lowered, qps = built[kept]
    refit = None
    if space.adaround.sequential and plan.rounded:  # the chosen adaptive layers, re-fitted on the quantized inputs
        from .refit import refit_rounding

        t = time.perf_counter()
        done = refit_rounding(pm, plan, lowered, qps, calibration.data, calibration.data.pairs(options.metric_examples),
                              config, space.adaround, progress=progress)
        if done is not None:
            (refit, lowered), plan = done, done[0].plan
        timings["refit"] = time.perf_counter() - t
    notes = list(calibration.notes) + range_notes(space, plan) + ([refit.note()] if refit is not None else [])
    if result is not None and kept != config.objective:
        o, r = config.objective, result.robust
        notes.append(f"the guard kept the {kept} plan: " + (
            f"robust agreement under PGD {r[kept]:.3f} vs the {o} plan's {r[o]:.3f}, measured calibration loss "
            f"{result.losses[kept]:.4g} vs {result.losses[o]:.4g}" if r is not None else
            f"its measured calibration loss {result.losses[kept]:.4g} is below the {o} plan's {result.losses[o]:.4g}"))
    latency = None
    if table is not None:
        est = _estimate_ms(table, plan, pm, scored)
        limit = options.budget.limit_ms(table.float_ms)
        latency = {"limit_ms": limit, "estimate_ms": est, "float_ms": table.float_ms, "batch": table.batch, "source": table.source,
                   "attempts": attempts}
        notes.append(f"latency budget {options.budget.describe()} ({limit:.3g} ms): the plan's "
                     f"estimate {est:.3g} ms from per-layer costs measured on this CPU (float {table.float_ms:.3g} ms, "
                     f"batch {table.batch}, onnxruntime's profiler)")
    plan = dataclasses.replace(plan, guard=result, latency=latency, warnings=tuple(dict.fromkeys([*plan.warnings, *notes])))
    return Planned(plan, pm, calibration, lowered, qps, scored, timings, tuple(notes))
