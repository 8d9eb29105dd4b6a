"""The ``quantize`` pipeline: load -> calibrate -> score -> select -> plan -> lower -> write.

:func:`quantize` is the public API behind ``laqonnx quantize``. It writes the QDQ model, its plan
(``OUT`` with suffix ``.plan.json``) and, with ``baseline=``, onnxruntime's plain
``quantize_static`` model on the same calibration data (``OUT`` with suffix ``.<baseline>.onnx``).
Outputs are written atomically after everything succeeded; the input model is never modified.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .._util.io import atomic_write_json, check_output_path, save_model
from .._util.threads import compute_threads
from ..errors import DataError, OptionError, PlanError
from ..graph import PreparedModel, load_model
from .costs import choose
from .lower import BASELINES, LoweringSpec, lower, ort_baseline, quantized_tensors
from .metric import CandidateSpace, ObjectiveConfig, score_layers
from .numerics import PerChannel, PerTensor, weight_qparams
from .plan import LayerPlan, Plan, TensorRange

__all__ = ["quantize", "QuantizeResult", "plan_path_for", "INT4_NOTE"]

INT4_NOTE = (
    "int4 weights are not fused into onnxruntime's int8 CPU kernels: int4 layers run ~4x slower than int8"
)
_BATCH = 32


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize` wrote and measured."""

    output: Path
    plan_path: Path
    plan: Plan
    avg_weight_bits: float  # parameter-weighted over the weighted layers, float counted as 32
    size_bytes: int  # the written model file
    float_size_bytes: int  # the float model, serialized
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per stage
    baseline_output: Path | None = None
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "plan": str(self.plan_path),
            "baseline_output": None if self.baseline_output is None else str(self.baseline_output),
            "avg_weight_bits": self.avg_weight_bits,
            "size_bytes": self.size_bytes,
            "float_size_bytes": self.float_size_bytes,
            "timings": dict(self.timings),
            "warnings": list(self.warnings),
            "layers": [
                {"name": lp.name, "weight": lp.chosen.describe()[0], "activation": lp.chosen.describe()[1]}
                for lp in self.plan.layers
            ],
        }


def plan_path_for(output: str | os.PathLike[str]) -> Path:
    """``model.int8.onnx`` -> ``model.int8.plan.json``."""
    out = Path(output)
    return out.with_name((out.stem if out.suffix == ".onnx" else out.name) + ".plan.json")


def _baseline_path(output: Path, baseline: str) -> Path:
    return output.with_name((output.stem if output.suffix == ".onnx" else output.name) + f".{baseline}.onnx")


def _model_bytes(model: str | os.PathLike[str] | onnx.ModelProto) -> bytes:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    try:
        return Path(model).read_bytes()
    except OSError:
        return b""  # load_model reports the missing/unreadable model with a ModelError


# ------------------------------------------------------------------------------ calibration


def _calibration_batches(pm: PreparedModel, calib: Any, limit: int | None, adversarial: Any, eps: float, norm: str):
    """(batch iterator factory, example count, stats label)."""
    from ..data import open_data

    if adversarial is True and norm != "inf":
        raise DataError("generated adversarial calibration is L-inf PGD: with --norm 2 pass --adversarial-calib PATH.npz")
    source = open_data(calib, input_shape=pm.input_shape, split="train", limit=limit)
    if len(source) == 0:
        raise DataError("the calibration data is empty")
    adv_source = None
    if adversarial is not None and adversarial is not False and adversarial is not True:
        adv_source = open_data(adversarial, input_shape=pm.input_shape, split="train", limit=limit)
    total = len(source) + (len(adv_source) if adv_source is not None else len(source) if adversarial is True else 0)

    def batches() -> Iterator[np.ndarray]:
        mirror = None
        for x, _ in source.batches(_BATCH):
            x = np.ascontiguousarray(x, dtype=np.float32).reshape((-1, *pm.input_shape[1:]))
            yield x
            if adversarial is True:
                if mirror is None:
                    from ..errors import require

                    require("torch", "robustness")
                    from ..robustness.mirror import build_mirror

                    mirror = build_mirror(pm.model)
                yield _pgd_batch(mirror, x, eps)
        if adv_source is not None:
            for x, _ in adv_source.batches(_BATCH):
                yield np.ascontiguousarray(x, dtype=np.float32).reshape((-1, *pm.input_shape[1:]))

    label = "clean" if adversarial in (None, False) else "clean+adversarial (merged histograms)"
    return batches, total, label


def _pgd_batch(mirror: Any, x: np.ndarray, eps: float) -> np.ndarray:
    """PGD-Linf (10 steps, seeded) on the float model's torch mirror, against its own predictions."""
    from ..errors import require

    torch = require("torch", "robustness")
    from ..zoo.pgd import pgd

    xt = torch.from_numpy(x)
    with torch.no_grad(), compute_threads(1):
        y = mirror(xt).argmax(1)
    gen = torch.Generator().manual_seed(0)
    with compute_threads(1):
        return pgd(mirror, xt, y, eps, steps=10, generator=gen).numpy().astype(np.float32)


# ------------------------------------------------------------------------------ the pipeline


def _ranges(pm: PreparedModel, stats: Mapping[str, Any], layers: tuple[LayerPlan, ...], default, tensors) -> tuple[TensorRange, ...]:
    from .ranges import activation_range

    spec = {lp.input: lp.chosen.activation for lp in layers}
    out = []
    for t in tensors:
        if t not in stats:
            continue
        a = spec.get(t, default)
        rmin, rmax = activation_range(stats[t], a)
        out.append(TensorRange(t, a, float(rmin), float(rmax)))
    return tuple(out)


def _with_scales(pm: PreparedModel, plan: Plan, known: Mapping[str, Mapping[Any, Any]] | None = None) -> tuple[Plan, dict[str, Any]]:
    """Weight qparams of the chosen settings (reusing those computed while scoring) into the plan."""
    import dataclasses

    qps: dict[str, Any] = {}
    layers = []
    for lp in plan.layers:
        w = lp.chosen.weight
        if w is None:
            layers.append(dataclasses.replace(lp, weight_scale=None, weight_zero_point=None))
            continue
        qp = (known or {}).get(lp.name, {}).get(w)
        if qp is None:
            qp = weight_qparams(pm.weight(pm.layer(lp.name)), w)
        qps[lp.weight] = qp
        layers.append(
            dataclasses.replace(
                lp,
                weight_scale=tuple(float(s) for s in np.ravel(qp.scale)),
                weight_zero_point=tuple(int(z) for z in np.ravel(qp.zero_point)),
            )
        )
    return dataclasses.replace(plan, layers=tuple(layers)), qps


def quantize(
    model: str | os.PathLike[str] | onnx.ModelProto,
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
    calib_limit: int | None = None,
    allow_float: bool = False,
    progress: bool = True,
    candidates: CandidateSpace | None = None,
    norm_max_spatial: int | None = 32,
) -> QuantizeResult:
    """Quantize ``model`` to a QDQ int8 model at ``output`` (see :mod:`laqonnx.quant.metric` for the
    metric). ``calib``: a data spec (``"digits"``, ``.npz``, image folder, CIFAR batches).
    ``adversarial_calib``: ``True`` for PGD examples on the float model at ``eps``, or a data spec of
    adversarial examples. ``per_channel``: ``None`` scores both granularities, ``True``/``False``
    only one (and sets the baseline's granularity). ``plan``: re-apply a (possibly edited) plan;
    ranges are recomputed when ``calib`` is given, else the plan's stored ranges are used.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    config = ObjectiveConfig(objective=objective, eps=float(eps), norm=str(norm), norm_max_spatial=norm_max_spatial)
    if avg_weight_bits is not None and max_bytes is not None:
        raise OptionError("give at most one budget: avg_weight_bits or max_bytes")
    if avg_weight_bits is not None and not (isinstance(avg_weight_bits, (int, float)) and avg_weight_bits > 0):
        raise OptionError(f"avg_weight_bits must be > 0, got {avg_weight_bits!r}")
    if max_bytes is not None and not (isinstance(max_bytes, int) and max_bytes > 0):
        raise OptionError(f"max_bytes must be a positive int, got {max_bytes!r}")
    if plan is not None and (avg_weight_bits is not None or max_bytes is not None):
        raise PlanError("a budget does not apply when re-applying a plan (--plan): edit the plan's settings instead")
    if plan is not None and candidates is not None:
        raise PlanError("candidate sets (--weight-methods/--activation-methods, candidates=) choose what to score; they do not "
                        "apply when re-applying a plan (--plan): edit the plan's settings instead")
    if baseline is not None and baseline not in BASELINES:
        raise OptionError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if calib_limit is not None and (not isinstance(calib_limit, int) or calib_limit < 1):
        raise OptionError(f"calib_limit must be a positive int, got {calib_limit!r}")
    space = candidates or CandidateSpace(allow_float=allow_float)
    if per_channel is not None:
        gran = (PerChannel(),) if per_channel else (PerTensor(),)
        space = CandidateSpace(**{**space.__dict__, "granularities": gran})
    if allow_float and not space.allow_float:
        space = CandidateSpace(**{**space.__dict__, "allow_float": True})

    inputs = [None if isinstance(model, onnx.ModelProto) else model]
    plan_in = None if plan is None or isinstance(plan, Plan) else plan
    out = check_output_path(output, *inputs, plan_in)
    plan_out = check_output_path(plan_path_for(out), *inputs, plan_in)
    base_out = check_output_path(_baseline_path(out, baseline), *inputs, plan_in) if baseline else None

    raw = _model_bytes(model)
    pm = load_model(model, input_shape, allow_quantized=False)  # refuse an already-quantized model
    sha = hashlib.sha256(raw).hexdigest()
    timings["load"] = time.perf_counter() - t0
    tensors = quantized_tensors(pm.model)
    warnings: list[str] = []

    stats = None
    batches = None
    known_qparams: dict[str, Any] = {}
    if calib is not None:
        t = time.perf_counter()
        from .collect import collect

        batches, total, label = _calibration_batches(pm, calib, calib_limit, adversarial_calib, config.eps, config.norm)
        # tensors that are no layer's input only ever get the default range: no histogram needed then
        inputs = {layer.input for layer in pm.layers}
        cheap = [t for t in tensors if t not in inputs] if space.default_activation.method == "minmax" else []
        stats = collect(pm.model, tensors, batches(), progress=progress, total=total, minmax_only=cheap)
        timings["calibrate"] = time.perf_counter() - t
    elif plan is None:
        raise DataError("calibration data is required (--calib), unless re-applying a plan with --plan")

    if plan is not None:
        the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        the_plan.validate(pm.layers, sha)
        if stats is not None:
            the_plan = _replace_ranges(the_plan, _ranges(pm, stats, the_plan.layers, space.default_activation, tensors))
        else:
            _check_stored_ranges(the_plan, tensors)
    else:
        t = time.perf_counter()
        budget = avg_weight_bits is not None or max_bytes is not None
        bits = tuple(space.weight_bits) + ((32,) if space.allow_float else ()) if budget else (8,)
        scored = score_layers(pm, stats, config, space, weight_bits=bits, progress=progress)
        timings["score"] = time.perf_counter() - t
        t = time.perf_counter()
        chosen = choose(scored, pm, avg_weight_bits, max_bytes)
        timings["select"] = time.perf_counter() - t
        layers = tuple(
            LayerPlan(
                name=lt.layer.name,
                op_type=lt.layer.op_type,
                weight=lt.layer.weight,
                input=lt.layer.input,
                params=int(np.prod(lt.layer.weight_shape)),
                channel_axis=lt.layer.channel_axis,
                chosen=lt.scores[chosen[lt.layer.name]].candidate,
                operator_norm=lt.operator_norm,
                gain=lt.gain,
                lipschitz_derivative=lt.derivative,
                input_norm=lt.input_norm,
                scores=lt.scores,
            )
            for lt in scored.layers
        )
        warnings += scored.warnings
        known_qparams = {lt.layer.name: lt.qparams for lt in scored.layers}
        the_plan = Plan(
            model_sha256=sha,
            input_name=pm.input_name,
            input_shape=tuple(pm.input_shape),
            layers=layers,
            ranges=_ranges(pm, stats, layers, space.default_activation, tensors),
            objective=config.objective,
            eps=config.eps,
            norm=config.norm,
            eps_l2=scored.eps_l2,
            avg_weight_bits=None if avg_weight_bits is None else float(avg_weight_bits),
            max_bytes=max_bytes,
            adversarial_calib=adversarial_calib not in (None, False),
            activation_stats=label,
            network_bound=scored.network_bound,
            warnings=tuple(warnings),
        )
    int4 = [lp.name for lp in the_plan.layers if lp.chosen.weight is not None and lp.chosen.weight.bits == 4]
    if int4:
        warnings.append(f"{INT4_NOTE} ({len(int4)} int4 layer(s): {', '.join(int4)})")

    t = time.perf_counter()
    the_plan, qps = _with_scales(pm, the_plan, known_qparams)
    rng = the_plan.range_map()
    spec = LoweringSpec(
        weights=qps,
        ranges={k: (r.rmin, r.rmax) for k, r in rng.items()},
        activations={k: r.activation for k, r in rng.items() if r.activation.bits != 8 or r.activation.symmetric},
        exclude=tuple(lp.name for lp in the_plan.layers if lp.chosen.weight is None),
    )
    qmodel = lower(pm.model, spec)
    timings["lower"] = time.perf_counter() - t
    base_model = None
    if baseline is not None:
        if batches is None:
            raise DataError("--baseline needs calibration data (--calib)")
        t = time.perf_counter()
        base_model = ort_baseline(pm.model, pm.input_name, list(_clean_only(pm, calib, calib_limit)), method=baseline, per_channel=bool(per_channel))
        timings["baseline"] = time.perf_counter() - t

    # write everything only now: a failure above leaves existing outputs untouched
    t = time.perf_counter()
    save_model(qmodel, out, *inputs, plan_in)
    atomic_write_json(plan_out, the_plan.to_json())
    if base_model is not None:
        save_model(base_model, base_out, *inputs, plan_in)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return QuantizeResult(
        output=out,
        plan_path=plan_out,
        plan=the_plan,
        avg_weight_bits=the_plan.avg_bits,
        size_bytes=out.stat().st_size,
        float_size_bytes=pm.model.ByteSize(),
        timings=timings,
        baseline_output=base_out if base_model is not None else None,
        warnings=tuple(dict.fromkeys(warnings)),
    )


def _clean_only(pm: PreparedModel, calib: Any, limit: int | None) -> Iterator[np.ndarray]:
    from ..data import open_data

    source = open_data(calib, input_shape=pm.input_shape, split="train", limit=limit)
    for x, _ in source.batches(_BATCH):
        yield np.ascontiguousarray(x, dtype=np.float32).reshape((-1, *pm.input_shape[1:]))


def _replace_ranges(plan: Plan, ranges: tuple[TensorRange, ...]) -> Plan:
    import dataclasses

    return dataclasses.replace(plan, ranges=ranges)


def _check_stored_ranges(plan: Plan, tensors: list[str]) -> None:
    rng = plan.range_map()
    missing = [t for t in tensors if t not in rng]
    if missing:
        raise PlanError(f"the plan has no activation range for {', '.join(missing[:5])}: re-apply it with --calib")
    for lp in plan.layers:
        if rng[lp.input].activation != lp.chosen.activation:
            raise PlanError(
                f"layer {lp.name}: its activation setting was edited, so the stored range of {lp.input!r} is stale: "
                "re-apply the plan with --calib to recompute ranges"
            )

