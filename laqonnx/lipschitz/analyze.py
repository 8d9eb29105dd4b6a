"""The analysis a user sees: per-layer Lipschitz constants and weight-quantization errors.

>>> a = laqonnx.analyze("model.onnx", input_shape=(1, 3, 32, 32))
>>> a.network_bound, [(x.name, x.lipschitz) for x in a.layers]
>>> json.dumps(a.to_json())
>>> laqonnx.analyze("model.onnx", calib="calib.npz").bound_kind  # products, Exp, ... on the calibration data
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from ..vocab import BoundKind

__all__ = ["LayerAnalysis", "WeightErrors", "Analysis", "analyze"]


@dataclass(frozen=True)
class WeightErrors:
    """Relative weight error ``||W - Q(W)||_F / ||W||_F`` of symmetric max-abs quantization."""

    int8_per_tensor: float
    int8_per_channel: float
    int4_per_tensor: float
    int4_per_channel: float


@dataclass(frozen=True)
class LayerAnalysis:
    name: str  # the ONNX node name
    op_type: str
    weight: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...] | None
    lipschitz: float
    lipschitz_method: str
    lipschitz_note: str
    lipschitz_iterations: int
    gain: float | None  # bound from this layer's output to the network output (None: unknown)
    weight_error: WeightErrors  # of the weight as analysed (a quantized model: its dequantized weight)
    weight_bits: int | None = None  # bits of a weight stored quantized (QDQ model); None: float
    weight_granularity: str | None = None  # "per_tensor" / "per_channel" for a quantized weight
    gain_kind: BoundKind | None = BoundKind.GLOBAL  # what the gain covers (None: unknown)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "weight": self.weight,
            "weight_shape": list(self.weight_shape),
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "lipschitz": self.lipschitz,
            "lipschitz_method": self.lipschitz_method,
            "lipschitz_note": self.lipschitz_note,
            "lipschitz_iterations": self.lipschitz_iterations,
            "gain": self.gain,
            "gain_kind": None if self.gain_kind is None else str(self.gain_kind),
            "weight_error": {k: getattr(self.weight_error, k) for k in WeightErrors.__dataclass_fields__},
            "weight_bits": self.weight_bits,
            "weight_granularity": self.weight_granularity,
        }


@dataclass(frozen=True)
class Analysis:
    model: str | None  # the model path, or None for an in-memory ModelProto
    input_shape: tuple[int, ...]
    layers: tuple[LayerAnalysis, ...]
    network_bound: float | None
    unknown_ops: tuple[str, ...]
    skipped: tuple[tuple[str, str, str], ...]  # (node name, op type, reason)
    warnings: tuple[str, ...]
    quantized: bool = False  # the model as read was quantized (its dequantized weights are analysed)
    bound_kind: BoundKind | None = BoundKind.GLOBAL  # None: network_bound unknown
    data_dependent: tuple[str, ...] = ()  # nodes bounded from calibrated ranges
    calibration_examples: int | None = None  # examples the ranges were calibrated on (None: no --calib)
    unknown_reasons: Mapping[str, str] = field(default_factory=dict)  # node -> why it has no bound

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "quantized": self.quantized,
            "input_shape": list(self.input_shape),
            "layers": [layer.to_json() for layer in self.layers],
            "network_bound": self.network_bound,
            "bound_kind": None if self.bound_kind is None else str(self.bound_kind),
            "data_dependent": list(self.data_dependent),
            "calibration_examples": self.calibration_examples,
            "unknown_ops": list(self.unknown_ops),
            "unknown_reasons": dict(self.unknown_reasons),
            "skipped": [{"name": n, "op_type": o, "reason": r} for n, o, r in self.skipped],
            "warnings": list(self.warnings),
        }


def _weight_errors(w, axis: int) -> WeightErrors:
    from ..quant.numerics import PerChannel, PerTensor, WeightQuant, relative_weight_error

    def err(bits: int, gran) -> float:
        return relative_weight_error(w, WeightQuant(bits=bits, granularity=gran, method="maxabs"))

    return WeightErrors(
        int8_per_tensor=err(8, PerTensor()),
        int8_per_channel=err(8, PerChannel(axis=axis)),
        int4_per_tensor=err(4, PerTensor()),
        int4_per_channel=err(4, PerChannel(axis=axis)),
    )


def _cpu_warning() -> str | None:
    try:
        from ..latency import cpu_info
    except ImportError:  # a build without the latency module: read the flags ourselves
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                flags = set(fh.read().lower().split())
        except OSError:
            return None
        if flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"}:
            return None
        return "this CPU has no VNNI or AMX int8 instructions: int8 may not be faster than float here"
    return cpu_info().int8_warning()


def analyze(
    model: str | os.PathLike[str] | onnx.ModelProto,
    input_shape: Sequence[int] | None = None,
    *,
    progress: bool = True,
    tol: float = 1e-4,
    max_iter: int = 500,
    calib: Any = None,
    calib_size: int | None = None,
    input_range: tuple[float, float] | None = None,
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> Analysis:
    """Per-layer Lipschitz constants, weight errors and the whole-network bound of ``model``.

    A quantized (QDQ) model is analysed with its dequantized weights; its activation
    QuantizeLinear/DequantizeLinear pairs count as identity (a warning says so).

    ``input_shape`` (batch first, e.g. ``(1, 3, 32, 32)``) is required when the model's input has
    a dynamic size other than the batch. Raises :class:`laqonnx.errors.ModelError` on bad input.

    Products of two activations (SE blocks, attention), Exp, LayerNormalization's tight bound and
    the like have no global bound: ``calib`` (a data spec as :func:`laqonnx.data.open_data` accepts,
    at most ``calib_size`` examples, checked against ``input_range``) calibrates the value ranges
    they need, and they are then bounded on the calibration data (``bound_kind`` "data-dependent").
    ``ranges`` (tensor name -> (min, max)) gives such ranges directly. Without either they are
    unknown, and so is every bound through them (None, never 0).
    """
    from tqdm import tqdm

    from ..graph import load_model
    from .network import network_bounds
    from .norms import operator_norm

    pm = load_model(model, input_shape)
    norms = {}
    for layer in tqdm(pm.layers, desc="operator norms", unit="layer", disable=not progress, leave=False):
        norms[layer.name] = operator_norm(layer, pm.weight(layer), tol=tol, max_iter=max_iter)
    layer_norms = {k: v.value for k, v in norms.items()}
    examples, notes = None, ()
    if calib is not None:
        from ..errors import OptionError
        from .calib import calibrated_ranges

        if ranges is not None:
            raise OptionError("give calib or ranges, not both")
        found = calibrated_ranges(pm, layer_norms, calib, limit=calib_size, input_range=input_range, progress=progress)
        ranges, examples, notes = found.ranges, found.examples, found.notes
    bounds = network_bounds(pm, layer_norms, ranges)
    layers = tuple(
        LayerAnalysis(
            name=layer.name,
            op_type=layer.op_type,
            weight=layer.weight,
            weight_shape=tuple(layer.weight_shape),
            input_shape=layer.input_shape,
            lipschitz=norms[layer.name].value,
            lipschitz_method=norms[layer.name].method,
            lipschitz_note=norms[layer.name].note,
            lipschitz_iterations=norms[layer.name].iterations,
            gain=bounds.gains.get(layer.name),
            weight_error=_weight_errors(pm.weight(layer), layer.channel_axis),
            weight_bits=layer.weight_bits,
            weight_granularity=None if layer.weight_qparams is None
            else "per_channel" if layer.weight_qparams.per_channel else "per_tensor",
            gain_kind=bounds.gain_kinds.get(layer.name, BoundKind.GLOBAL),
        )
        for layer in pm.layers
    )
    warnings: list[str] = []
    cpu = _cpu_warning()
    if cpu:
        warnings.append(cpu)
    if pm.activation_qdq_pairs:
        warnings.append(
            f"activation quantization treated as identity ({pm.activation_qdq_pairs} QuantizeLinear/DequantizeLinear "
            "pairs): the bound covers the dequantized weights, not activation rounding"
        )
    for op in bounds.unknown_ops:
        why = bounds.unknown_reasons.get(op)
        warnings.append(f"no Lipschitz bound for {op}{f' ({why})' if why else ''}: the bound downstream of it is unknown")
    if bounds.data_dependent:
        on = "the given ranges" if examples is None else f"the calibration data, {examples} examples"
        warnings.append(f"data-dependent bounds (on {on}), not for every input: {', '.join(bounds.data_dependent)}")
    warnings += [f"calibration: {n}" for n in notes]
    for s in pm.skipped:
        warnings.append(f"skipped {s.name} ({s.op_type}): {s.reason}")
    for x in layers:
        if x.lipschitz_note:
            warnings.append(f"{x.name}: {x.lipschitz_note}")
    return Analysis(
        model=pm.source,
        input_shape=pm.input_shape,
        layers=layers,
        network_bound=bounds.network_bound,
        unknown_ops=bounds.unknown_ops,
        skipped=tuple((s.name, s.op_type, s.reason) for s in pm.skipped),
        warnings=tuple(warnings),
        quantized=pm.quantized,
        bound_kind=bounds.bound_kind,
        data_dependent=bounds.data_dependent,
        calibration_examples=examples,
        unknown_reasons=dict(bounds.unknown_reasons),
    )
