"""The quantization plan: frozen dataclasses and a versioned JSON round trip.

A plan records, per weighted layer, the chosen setting and every scored weight candidate's terms;
per tensor with a QDQ pair, its activation setting and range (and, for layer inputs, every scored
activation candidate); the guard's measured comparison of the chosen plan with its alternatives;
and the post-write check. It is written beside the quantized model as ``OUT.plan.json``; a user may
edit a layer's ``chosen`` block and re-apply it with ``--plan``. Re-applying validates the plan
against the model (format version, model hash, layer names, settings, per-channel axes) and raises
:class:`PlanError` on a mismatch. Version-1 plans (the first metric) are read for their chosen
settings and ranges; their scores are dropped.

Activation ranges are stored, so a re-apply without calibration data works; with ``--calib`` they
are recomputed from the new data with each tensor's setting. A layer whose activation setting was
edited needs ``--calib`` (its stored range was computed with the old setting). Weight scales are
derived from the model weights and the setting: they are written for review and recomputed on
re-apply (so editing a setting is enough).

JSON schema (``format: "laqonnx.plan"``, ``version: 2``)::

    {"format", "version", "model": {"sha256", "input_name", "input_shape"},
     "settings": {"objective", "eps", "norm", "input_range": [lo, hi] | null, "avg_weight_bits",
                  "max_bytes", "max_latency": {"ms" | "relative", "batch"} | null, "adversarial_calib": str, "activation_stats": str,
                  "metric": {"engine", "examples", "projections", "exact", "adversarial_weight"}},
     "guard": {"kept", "examples", "losses": {name: float}} | null,
     "check": {"agreement", "examples"} | null, "warnings": [str],
     "latency": {"limit_ms", "estimate_ms", "float_ms", "batch", "measured_ms", "float_measured_ms", "within"} | null,
     "layers": [{"name", "op_type", "weight", "input", "params", "channel_axis",
                 "chosen": CANDIDATE, "weight_scale": [float] | null, "weight_zero_point": [int] | null,
                 "candidates": [{"weight": WEIGHT | null, "clean", "adversarial", "metric", "cost_bits"}]}],
     "ranges": [{"tensor", "activation": ACTIVATION, "rmin", "rmax",
                 "candidates": [{"activation": ACTIVATION, "clean", "adversarial", "metric"}]}]}
    CANDIDATE  = {"weight": WEIGHT | null (float), "activation": ACTIVATION}
    WEIGHT     = {"bits": 8|4, "granularity": "per_tensor"|"per_channel", "method", "percentile"}
    ACTIVATION = {"bits": 8|16, "method", "percentile", "symmetric"}

``clean`` and ``adversarial`` are the metric's quantization and adversarial terms (squared
centred-logit units, see :mod:`laqonnx.quant.metric`); ``adversarial`` is null without
adversarial calibration.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PlanError
from .metric import ActivationScore, Candidate, WeightScore
from .numerics import ActivationQuant, PerChannel
from .plan_codec import (activation_from_json, activation_to_json, candidate_from_json, candidate_to_json, load_rounding,
                         opt_float, rounding_bytes, weight_from_json, weight_to_json)

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "LayerPlan",
    "TensorRange",
    "GuardResult",
    "Plan",
    "load_rounding",
    "rounding_bytes",
    "weight_to_json",
    "weight_from_json",
    "activation_to_json",
    "activation_from_json",
]

PLAN_FORMAT = "laqonnx.plan"
PLAN_VERSION = 2
_READABLE = (1, 2)


@dataclass(frozen=True)
class LayerPlan:
    name: str
    op_type: str
    weight: str
    input: str
    params: int
    channel_axis: int
    chosen: Candidate
    scores: tuple[WeightScore, ...] = ()
    rounding_error: tuple[float, float] | None = None  # (nearest, adaptive) output error of an adaptive choice
    activation_tensor: str | None = None  # the tensor whose range the input gets in onnxruntime (None: the input)

    @property
    def activation_source(self) -> str:
        return self.activation_tensor or self.input
    weight_scale: tuple[float, ...] | None = None
    weight_zero_point: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TensorRange:
    """The calibrated range of one QDQ'd tensor and the setting that produced it."""

    tensor: str
    activation: ActivationQuant
    rmin: float
    rmax: float
    scores: tuple[ActivationScore, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.rmin, (int, float)) and isinstance(self.rmax, (int, float))):
            raise ValueError(f"range of {self.tensor!r} must be numbers")
        if not (float("-inf") < self.rmin <= self.rmax < float("inf")):
            raise ValueError(f"invalid range [{self.rmin}, {self.rmax}] for tensor {self.tensor!r}")


@dataclass(frozen=True)
class GuardResult:
    """The guard's comparison: the measured calibration loss of each alternative plan (through
    onnxruntime), and which one was kept (the lowest; with the robust guard, the lowest among the
    most robust: ``robust`` holds each one's robust agreement under PGD on its own mirror, on
    ``robust_examples`` clean calibration inputs)."""

    kept: str
    losses: Mapping[str, float]
    examples: int
    robust: Mapping[str, float] | None = None
    robust_examples: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kept": self.kept, "examples": self.examples, "losses": {k: float(v) for k, v in self.losses.items()}}
        if self.robust is not None:
            out.update(robust={k: float(v) for k, v in self.robust.items()}, robust_examples=self.robust_examples)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GuardResult:
        robust = d.get("robust")
        return cls(str(d["kept"]), {str(k): float(v) for k, v in d["losses"].items()}, int(d.get("examples", 0)),
                   None if robust is None else {str(k): float(v) for k, v in robust.items()}, int(d.get("robust_examples", 0)))


@dataclass(frozen=True)
class Plan:
    model_sha256: str
    input_name: str
    input_shape: tuple[int, ...]
    layers: tuple[LayerPlan, ...]
    ranges: tuple[TensorRange, ...]
    objective: str = "laq"
    eps: float = 0.0
    norm: str = "inf"
    input_range: tuple[float, float] | None = None
    avg_weight_bits: float | None = None
    max_bytes: int | None = None
    max_latency: Mapping[str, Any] | None = None  # {"ms" or "relative", "batch"}
    adversarial_calib: str = "off"
    activation_stats: str = "clean"
    metric: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    guard: GuardResult | None = None
    check: Mapping[str, Any] | None = None
    latency: Mapping[str, Any] | None = None  # the budget in ms, the plan's estimate, the written model's measurement
    warnings: tuple[str, ...] = ()
    rounding_file: str | None = None  # the .npz beside the plan holding adaptive layers' integer weights
    rounded: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)  # weight -> integers
    version: int = PLAN_VERSION

    # -- queries ---------------------------------------------------------------------------
    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    def range_map(self) -> dict[str, TensorRange]:
        return {r.tensor: r for r in self.ranges}

    @property
    def avg_bits(self) -> float:
        """Parameter-weighted average weight bits (float weights count 32)."""
        total = sum(lp.params for lp in self.layers)
        return sum(lp.params * lp.chosen.weight_bits for lp in self.layers) / total if total else 0.0

    def with_choice(self, layer: str, candidate: Candidate) -> Plan:
        """A copy with ``layer``'s chosen setting replaced (its derived weight scales dropped)."""
        self.layer(layer)
        layers = tuple(
            dataclasses.replace(lp, chosen=candidate, weight_scale=None, weight_zero_point=None)
            if lp.name == layer
            else lp
            for lp in self.layers
        )
        return dataclasses.replace(self, layers=layers)

    # -- validation ------------------------------------------------------------------------
    def validate(self, layers: Iterable[Any], model_sha256: str) -> None:
        """Check the plan fits the model (``layers``: graph.Layer objects); PlanError otherwise."""
        if self.model_sha256 != model_sha256:
            raise PlanError(
                f"the plan was made for another model (sha256 {self.model_sha256[:12]}..., "
                f"this model is {model_sha256[:12]}...)"
            )
        by_name = {layer.name: layer for layer in layers}
        names = [lp.name for lp in self.layers]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise PlanError(f"the plan names layers the model does not have: {', '.join(unknown)}")
        missing = [n for n in by_name if n not in names]
        if missing:
            raise PlanError(f"the plan has no setting for layers: {', '.join(missing)}")
        if len(set(names)) != len(names):
            raise PlanError("the plan lists a layer more than once")
        shared: dict[str, ActivationQuant] = {}
        weights: dict[str, Candidate] = {}
        for lp in self.layers:
            other = weights.setdefault(lp.weight, lp.chosen)
            if other.weight != lp.chosen.weight:
                raise PlanError(f"layers sharing weight {lp.weight!r} must share one weight setting")
            layer = by_name[lp.name]
            if lp.weight != layer.weight or lp.input != layer.input:
                raise PlanError(f"layer {lp.name}: weight/input names do not match the model")
            w = lp.chosen.weight
            if w is not None and isinstance(w.granularity, PerChannel) and w.granularity.axis != layer.channel_axis:
                raise PlanError(
                    f"layer {lp.name}: per-channel axis {w.granularity.axis} is not the output-channel "
                    f"axis {layer.channel_axis}"
                )
            prev = shared.setdefault(lp.activation_source, lp.chosen.activation)
            if prev != lp.chosen.activation:
                raise PlanError(
                    f"layers reading tensor {lp.activation_source!r} must share one activation setting (one QDQ per tensor)"
                )

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": {"sha256": self.model_sha256, "input_name": self.input_name, "input_shape": list(self.input_shape)},
            "settings": {
                "objective": self.objective,
                "eps": self.eps,
                "norm": self.norm,
                "input_range": None if self.input_range is None else list(self.input_range),
                "avg_weight_bits": self.avg_weight_bits,
                "max_bytes": self.max_bytes,
                "max_latency": None if self.max_latency is None else dict(self.max_latency),
                "adversarial_calib": self.adversarial_calib,
                "activation_stats": self.activation_stats,
                "metric": dict(self.metric),
                "rounding_file": self.rounding_file,
            },
            "guard": None if self.guard is None else self.guard.to_json(),
            "check": None if self.check is None else dict(self.check),
            "latency": None if self.latency is None else dict(self.latency),
            "warnings": list(self.warnings),
            "layers": [_layer_to_json(lp) for lp in self.layers],
            "ranges": [_range_to_json(r) for r in self.ranges],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Plan:
        try:
            return _plan_from_json(d)
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"invalid plan: {type(exc).__name__}: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        from .._util.io import atomic_write_json

        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError as exc:
            raise PlanError(f"plan file {path} does not exist") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read plan {path}: {exc}") from exc
        plan = cls.from_json(data)
        if plan.rounding_file:
            plan = dataclasses.replace(plan, rounded=load_rounding(Path(path).parent / plan.rounding_file))
        return plan


def _layer_to_json(lp: LayerPlan) -> dict[str, Any]:
    return {
        "name": lp.name,
        "op_type": lp.op_type,
        "weight": lp.weight,
        "input": lp.input,
        "activation_tensor": lp.activation_source,
        "params": lp.params,
        "channel_axis": lp.channel_axis,
        "chosen": candidate_to_json(lp.chosen),
        "weight_scale": None if lp.weight_scale is None else list(lp.weight_scale),
        "weight_zero_point": None if lp.weight_zero_point is None else list(lp.weight_zero_point),
        "rounding_error": None if lp.rounding_error is None else {"nearest": lp.rounding_error[0], "adaptive": lp.rounding_error[1]},
        "candidates": [
            {"weight": weight_to_json(s.setting), "clean": s.clean, "adversarial": s.adversarial, "metric": s.metric,
             "cost_bits": s.cost_bits}
            for s in lp.scores
        ],
    }


def _range_to_json(r: TensorRange) -> dict[str, Any]:
    out: dict[str, Any] = {"tensor": r.tensor, "activation": activation_to_json(r.activation), "rmin": r.rmin, "rmax": r.rmax}
    if r.scores:
        out["candidates"] = [
            {"activation": activation_to_json(s.setting), "clean": s.clean, "adversarial": s.adversarial, "metric": s.metric}
            for s in r.scores
        ]
    return out


def _layer_from_json(d: Mapping[str, Any], version: int) -> LayerPlan:
    axis = int(d.get("channel_axis", 0))
    scores: tuple[WeightScore, ...] = ()
    if version >= 2:
        scores = tuple(
            WeightScore(weight_from_json(s["weight"], axis), float(s["clean"]), opt_float(s.get("adversarial")),
                        float(s["metric"]), int(s["cost_bits"]))
            for s in d.get("candidates", [])
        )
    ws, wz = d.get("weight_scale"), d.get("weight_zero_point")
    re_ = d.get("rounding_error")
    return LayerPlan(
        name=str(d["name"]),
        op_type=str(d["op_type"]),
        weight=str(d["weight"]),
        input=str(d["input"]),
        params=int(d["params"]),
        channel_axis=axis,
        chosen=candidate_from_json(d["chosen"], axis),
        scores=scores,
        weight_scale=None if ws is None else tuple(float(x) for x in ws),
        weight_zero_point=None if wz is None else tuple(int(x) for x in wz),
        rounding_error=None if re_ is None else (float(re_["nearest"]), float(re_["adaptive"])),
        activation_tensor=None if d.get("activation_tensor") in (None, d["input"]) else str(d["activation_tensor"]),
    )


def _range_from_json(r: Mapping[str, Any], version: int) -> TensorRange:
    scores: tuple[ActivationScore, ...] = ()
    if version >= 2:
        scores = tuple(
            ActivationScore(activation_from_json(s["activation"]), float(s["clean"]), opt_float(s.get("adversarial")),
                            float(s["metric"]))
            for s in r.get("candidates", [])
        )
    try:
        return TensorRange(str(r["tensor"]), activation_from_json(r["activation"]), float(r["rmin"]), float(r["rmax"]), scores)
    except ValueError as exc:
        raise PlanError(f"bad range in plan: {exc}") from exc


def _plan_from_json(d: Mapping[str, Any]) -> Plan:
    if not isinstance(d, Mapping) or d.get("format") != PLAN_FORMAT:
        raise PlanError(f"not a laqonnx plan (expected \"format\": \"{PLAN_FORMAT}\")")
    version = d.get("version")
    if version not in _READABLE:
        raise PlanError(f"unsupported plan version {version!r} (this laqonnx reads versions {', '.join(map(str, _READABLE))})")
    model, settings = d["model"], d.get("settings", {})
    mb = settings.get("max_bytes")
    awb = settings.get("avg_weight_bits")
    rng = settings.get("input_range")
    adv = settings.get("adversarial_calib", "off")
    if isinstance(adv, bool):  # version 1
        adv = "generated" if adv else "off"
    warnings = tuple(str(w) for w in d.get("warnings", []))
    if version == 1:
        warnings += ("read from a version-1 plan: its scores (the first metric) were dropped",)
    return Plan(
        model_sha256=str(model["sha256"]),
        input_name=str(model["input_name"]),
        input_shape=tuple(int(x) for x in model["input_shape"]),
        layers=tuple(_layer_from_json(lp, version) for lp in d["layers"]),
        ranges=tuple(_range_from_json(r, version) for r in d.get("ranges", [])),
        objective=str(settings.get("objective", "laq")),
        eps=float(settings.get("eps", 0.0)),
        norm=str(settings.get("norm", "inf")),
        input_range=None if rng is None else (float(rng[0]), float(rng[1])),
        avg_weight_bits=None if awb is None else float(awb),
        max_bytes=None if mb is None else int(mb),
        max_latency=None if settings.get("max_latency") is None else dict(settings["max_latency"]),
        adversarial_calib=str(adv),
        activation_stats=str(settings.get("activation_stats", "clean")),
        metric=dict(settings.get("metric", {})),
        guard=None if d.get("guard") is None else GuardResult.from_json(d["guard"]),
        check=None if d.get("check") is None else dict(d["check"]),
        latency=None if d.get("latency") is None else dict(d["latency"]),
        warnings=warnings,
        rounding_file=settings.get("rounding_file"),
        version=PLAN_VERSION,
    )
