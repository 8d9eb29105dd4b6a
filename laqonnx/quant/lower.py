"""Lowering: planned quantization parameters -> a QDQ model written by onnxruntime's own quantizer.

We drive :class:`onnxruntime.quantization.QDQQuantizer` (exported by
``onnxruntime.quantization``, the class ``quantize_static`` itself builds) directly:

* activation ranges come from OUR calibration, passed as ``TensorsData`` (min/max per tensor), so
  onnxruntime's calibration pass (an augmented model run over the data a second time) is skipped;
  onnxruntime turns each range into a scale/zero point with its own ``compute_scale_zp``;
* weight scales/zero points/types are passed as ``TensorQuantOverrides`` (per-channel: one dict per
  output channel, the first carrying ``axis``), so the written ``DequantizeLinear`` initializers are
  exactly the planned ones; onnxruntime's int32-bias weight-scale adjustment is disabled for the
  same reason;
* layers left in float are ``nodes_to_exclude``;
* int4 weights or 16-bit activations need opset 21: the model is converted with
  ``onnx.version_converter`` first;
* int4 MatMul/Gemm weights are then rewritten into the form onnxruntime fuses into its
  ``MatMulNBits`` kernel (:mod:`.nbits`; ``LoweringSpec.nbits=None`` keeps the quantizer's layout).

The graph layout (which tensors get a QDQ pair, Relu removal, bias quantization to int32) is
onnxruntime's, so onnxruntime fuses the result into its int8 kernels. :func:`ort_baseline` runs the
plain ``quantize_static`` for side-by-side comparisons. The input model is never modified.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import ModelError, OptionError
from ..vocab import Baseline
from .nbits import NBits, to_nbits_form
from .numerics import ActivationQuant, QParams

__all__ = [
    "ORT_QUANTIZED_OPS",
    "LoweringSpec",
    "lower",
    "quantized_tensors",
    "ort_baseline",
    "drop_unused_initializers",
    "BASELINES",
]

QDQ_OPSET_FOR_LOW_BITS = 21
BASELINES = Baseline.values()


def _ort_quantized_ops() -> frozenset[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)


ORT_QUANTIZED_OPS: frozenset[str] = _ort_quantized_ops()


@dataclass(frozen=True)
class LoweringSpec:
    """Everything the lowering needs, keyed by tensor / node name.

    ``weights``: initializer name -> planned qparams. ``ranges``: activation tensor -> (rmin, rmax).
    ``activations``: activation tensor -> its setting, for tensors that differ from ``default``
    (e.g. 16-bit). ``exclude``: node names left in float. ``values``: initializer name -> float
    values written in place of the weight before quantizing (adaptive rounding: the dequantized
    learned integers, which the quantizer's own rounding with the planned scale gives back exactly).
    ``nbits``: how int4 MatMul/Gemm weights are written for onnxruntime's MatMulNBits fusion (None: as
    the quantizer writes them, unfused).
    """

    weights: Mapping[str, QParams]
    ranges: Mapping[str, tuple[float, float]]
    activations: Mapping[str, ActivationQuant] = field(default_factory=dict)
    default: ActivationQuant = field(default_factory=ActivationQuant)
    exclude: tuple[str, ...] = ()
    values: Mapping[str, np.ndarray] = field(default_factory=dict)
    nbits: NBits | None = field(default_factory=NBits)

    def __post_init__(self) -> None:
        for name, (lo, hi) in self.ranges.items():
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
                raise ValueError(f"invalid range [{lo}, {hi}] for tensor {name!r}")
        if self.default.bits != 8:
            raise ValueError("the default activation setting must be 8-bit")
        if not isinstance(self.exclude, tuple):
            object.__setattr__(self, "exclude", tuple(self.exclude))


def quantized_tensors(model: onnx.ModelProto, exclude: Iterable[str] = ()) -> list[str]:
    """Float activation tensors onnxruntime's quantizer may put a QDQ pair on (inputs/outputs of
    the op types it quantizes, not initializers), in graph order: the tensors to calibrate."""
    excluded = set(exclude)
    inits = {i.name for i in model.graph.initializer}
    inits |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    types: dict[str, int] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
    seen: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type not in ORT_QUANTIZED_OPS or node.name in excluded:
            continue
        for name in [*node.input, *node.output]:
            if name and name not in inits and types.get(name, onnx.TensorProto.FLOAT) in float_types:
                seen.setdefault(name, None)
    return list(seen)


def _quant_type(bits: int, signed: bool):
    from onnxruntime.quantization import QuantType

    return {
        (8, True): QuantType.QInt8,
        (8, False): QuantType.QUInt8,
        (4, True): QuantType.QInt4,
        (4, False): QuantType.QUInt4,
        (16, True): QuantType.QInt16,
        (16, False): QuantType.QUInt16,
    }[(bits, signed)]


def _weight_override(qp: QParams) -> list[dict]:
    # python float/int: onnxruntime rejects numpy scalars in some paths; float32 -> float -> float32 is exact
    qtype = _quant_type(qp.bits, qp.signed)
    if qp.axis is None:
        return [{"scale": float(qp.scale), "zero_point": int(qp.zero_point), "quant_type": qtype}]
    out = []
    for c in range(qp.scale.shape[0]):
        d = {"scale": float(qp.scale[c]), "zero_point": int(qp.zero_point[c]), "quant_type": qtype}
        if c == 0:
            d["axis"] = int(qp.axis)
        out.append(d)
    return out


def _opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer logs "please pre-process" warnings on the root logger: mute them."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _to_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, version)
        return onnx.shape_inference.infer_shapes(converted)
    except Exception as exc:  # the converter raises bare RuntimeErrors/ValueErrors
        raise ModelError(
            f"int4 weights / 16-bit activations need opset {version}, and converting the model failed: {exc}"
        ) from exc


def _constants_to_initializers(model: onnx.ModelProto, names: set[str]) -> None:
    """Weights held by Constant nodes become initializers (onnxruntime only quantizes initializers)."""
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in names:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                t = onnx.TensorProto()
                t.CopyFrom(value)
                t.name = node.output[0]
                model.graph.initializer.append(t)
                continue
        keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def lower(model: onnx.ModelProto, spec: LoweringSpec) -> onnx.ModelProto:
    """Return the QDQ model onnxruntime's quantizer writes for ``spec`` (``model`` is not modified)."""
    from onnxruntime.quantization import QDQQuantizer, TensorData, TensorsData
    from onnxruntime.quantization.calibrate import CalibrationMethod

    work = copy.deepcopy(model)
    _constants_to_initializers(work, set(spec.weights))
    if spec.values:
        from onnx import numpy_helper

        for init in work.graph.initializer:
            if init.name in spec.values:
                value = np.asarray(spec.values[init.name], dtype=np.float32)
                if tuple(value.shape) != tuple(init.dims):
                    raise ModelError(f"replacement values of {init.name!r} have shape {value.shape}, the weight {tuple(init.dims)}")
                init.CopyFrom(numpy_helper.from_array(value, init.name))
    low_bits = any(qp.bits != 8 for qp in spec.weights.values()) or any(a.bits != 8 for a in spec.activations.values())
    if low_bits and _opset(work) < QDQ_OPSET_FOR_LOW_BITS:
        work = _to_opset(work, QDQ_OPSET_FOR_LOW_BITS)

    int4 = {name for name, qp in spec.weights.items() if qp.bits == 4}
    floats = {}
    if int4 and spec.nbits is not None:
        from onnx import numpy_helper

        floats = {i.name: numpy_helper.to_array(i) for i in work.graph.initializer if i.name in int4}
    overrides: dict[str, list[dict]] = {name: _weight_override(qp) for name, qp in spec.weights.items()}
    for name, act in spec.activations.items():
        if act != spec.default:
            overrides[name] = [{"quant_type": _quant_type(act.bits, act.signed)}]
            if act.symmetric:
                overrides[name][0]["symmetric"] = True
    data = {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
        for name, (lo, hi) in spec.ranges.items()
        if name not in spec.weights
    }
    extra = {
        "TensorQuantOverrides": overrides,
        "QDQDisableWeightAdjustForInt32Bias": True,
        "ActivationSymmetric": spec.default.symmetric,
        "WeightSymmetric": True,
    }
    try:
        with _quiet_root_logger():
            quantizer = QDQQuantizer(
                work,
                False,  # per_channel: decided per weight by the overrides
                False,  # reduce_range
                _quant_type(8, True),
                _quant_type(8, spec.default.signed),
                TensorsData(CalibrationMethod.MinMax, data),
                [],
                list(spec.exclude),
                sorted(ORT_QUANTIZED_OPS),
                extra,
            )
            quantizer.quantize_model()
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"onnxruntime's quantizer rejected the plan: {exc}") from exc
    quantizer.model.topological_sort()  # what quantize_static does when it saves; keeps onnx.checker happy
    out = quantizer.model.model
    out.producer_name = "laqonnx"
    if int4 and spec.nbits is not None:
        to_nbits_form(out, floats, spec.nbits)
    drop_unused_initializers(out)
    return out


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    """Remove initializers no node (or subgraph) reads and no graph output names, in place (the
    quantizer leaves the float weights it replaced; onnxruntime warns about each on every load).
    Returns how many were removed."""
    used: set[str] = {o.name for o in model.graph.output}

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            used.update(n for n in node.input if n)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    keep = [t for t in model.graph.initializer if t.name in used]
    gone = {t.name for t in model.graph.initializer} - {t.name for t in keep}
    if gone:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        inputs = [i for i in model.graph.input if i.name not in gone]  # initializers listed as inputs (IR < 4)
        del model.graph.input[:]
        model.graph.input.extend(inputs)
    return len(gone)


class _Reader:
    """A ``CalibrationDataReader`` over in-memory batches (for the plain onnxruntime baseline)."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self._name = input_name
        self._batches = list(batches)
        self._i = 0

    def get_next(self):
        if self._i >= len(self._batches):
            return None
        self._i += 1
        return {self._name: self._batches[self._i - 1]}

    def __len__(self) -> int:
        return len(self._batches)

    def rewind(self) -> None:
        self._i = 0


def ort_baseline(
    model: onnx.ModelProto,
    input_name: str,
    batches: Sequence[np.ndarray],
    *,
    method: str = "ort-minmax",
    per_channel: bool = False,
    int4_weights: Sequence[str] = (),
    activation_bits: int = 8,
) -> onnx.ModelProto:
    """onnxruntime's plain ``quantize_static``: QDQ, uint8 activations (uint4 with
    ``activation_bits=4``), int8 weights, ``method``'s calibration, per-channel iff asked; the
    weights named in ``int4_weights`` get int4 through ``TensorQuantOverrides`` (the model is
    converted to opset 21 first, which int4 ``DequantizeLinear`` needs); with its ``reduce_range``
    (7-bit weights) on a CPU whose int8 kernels saturate full-range ones. Returns the model (written by onnxruntime in a temporary folder and
    read back, so the caller writes the output atomically)."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {
        "ort-minmax": CalibrationMethod.MinMax,
        "ort-percentile": CalibrationMethod.Percentile,
        "ort-entropy": CalibrationMethod.Entropy,
    }
    if method not in methods:
        raise OptionError(f"baseline must be one of {BASELINES}, got {method!r}")
    if activation_bits not in (4, 8):
        raise OptionError(f"the onnxruntime baseline takes 8- or 4-bit activations, got {activation_bits!r}")
    work = copy.deepcopy(model)
    extra = {}
    if (int4_weights or activation_bits == 4) and _opset(work) < QDQ_OPSET_FOR_LOW_BITS:
        work = _to_opset(work, QDQ_OPSET_FOR_LOW_BITS)
    if int4_weights:
        extra["TensorQuantOverrides"] = {w: [{"quant_type": QuantType.QInt4}] for w in int4_weights}
    with _quiet_root_logger(), tempfile.TemporaryDirectory(prefix="laqonnx-baseline-") as tmp:
        path = Path(tmp) / "baseline.onnx"
        quantize_static(
            work,
            str(path),
            _Reader(input_name, batches),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8 if activation_bits == 8 else QuantType.QUInt4,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options=extra,
            reduce_range=_int8_saturates(),  # onnxruntime's own advice for x86 without VNNI
        )
        return onnx.load(str(path))


def _int8_saturates() -> bool:
    from ..latency import cpu_info

    return cpu_info().int8_saturates()
