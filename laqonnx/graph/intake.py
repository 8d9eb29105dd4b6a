"""``load_model``: read a model, run the intake passes, infer shapes, walk the weighted layers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import MappingProxyType

import onnx

from ..errors import ModelError
from .batchnorm import FoldBatchNorm
from .constants import fold_constants, lift_constants
from .io import read_model
from .model import PreparedModel, constant_values
from .passes import Pass, one_line, run_passes
from .qdq import StrippedQDQ, StripQDQ, count_quantized_nodes
from .shapes import concrete_shapes, declared_batch, input_dtype, resolve_input_shape
from .structure import (
    OPSET_FLOOR,
    CheckModel,
    UpgradeOpset,
    default_opset,
    eliminate_identities,
    initializers_off_inputs,
    name_nodes,
    remove_unused_nodes,
    topological_sort,
)
from .walk import walk

__all__ = ["intake_passes", "load_model"]


def intake_passes(source: str | None = None, record: StrippedQDQ | None = None) -> list[Pass]:
    """The intake, in order (see :mod:`laqonnx.graph`). ``record`` receives what the QDQ pass did."""
    record = StrippedQDQ() if record is None else record
    return [
        topological_sort(),
        name_nodes(),
        CheckModel(source),
        UpgradeOpset(OPSET_FLOOR, source),
        initializers_off_inputs(),
        fold_constants(),
        lift_constants(),
        eliminate_identities(),
        StripQDQ(record),
        FoldBatchNorm(keep=record.qparams),  # filled in by StripQDQ before this pass runs
        name_nodes(),
        remove_unused_nodes(),
    ]


def _single_input(model: onnx.ModelProto, where: str) -> onnx.ValueInfoProto:
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise ModelError(f"{where} has {len(inputs)} inputs; laqonnx analyses single-input models")
    return inputs[0]


def _chosen_output(outputs: tuple[str, ...], output: str | None, where: str) -> str:
    if not outputs:
        raise ModelError(f"{where} has no outputs")
    if output is None:
        return outputs[0]
    if output not in outputs:
        raise ModelError(f"{output!r} is not an output of {where}; its outputs are: {', '.join(outputs)}")
    return output


def load_model(
    model: str | os.PathLike[str] | onnx.ModelProto,
    input_shape: Sequence[int] | None = None,
    *,
    allow_quantized: bool = True,
    output: str | None = None,
) -> PreparedModel:
    """Load, check and prepare a model for analysis and quantization.

    ``input_shape`` (batch first) is needed when the model's input has a dynamic size other than
    the batch; it must agree with every fixed dimension of the model. ``output`` names the graph
    output to analyse (default: the first). A quantized (QDQ) model is prepared as its dequantized
    float equivalent (see :mod:`laqonnx.graph`), or refused with ``allow_quantized=False``
    (quantizing must start from the float model). Raises :class:`ModelError`.
    """
    read = read_model(model)
    where = read.source or "the model"
    n_quant = count_quantized_nodes(read.model.graph)
    if n_quant and not allow_quantized:
        raise ModelError(
            f"{where} is already quantized ({n_quant} QuantizeLinear/DequantizeLinear or QLinear nodes): "
            "quantize the float model instead"
        )
    inp = _single_input(read.model, where)
    outputs = tuple(o.name for o in read.model.graph.output)
    output_name = _chosen_output(outputs, output, where)
    shape = resolve_input_shape(inp, input_shape)
    dtype = input_dtype(inp)
    source_opset = default_opset(read.model)

    record = StrippedQDQ()
    log = run_passes(read.model, intake_passes(read.source, record), where)
    try:
        proto = onnx.shape_inference.infer_shapes(log.model, data_prop=True)
    except Exception as exc:
        raise ModelError(f"shape inference failed on {where}: {one_line(exc)}") from exc
    shapes = concrete_shapes(proto, inp.name, shape, dtype)
    wshapes = {t.name: tuple(int(d) for d in t.dims) for t in proto.graph.initializer}
    consts = set(wshapes) | set(constant_values(proto))
    layers, skipped = walk(proto.graph, consts, shapes, wshapes, record.qparams, record.unsupported)
    if not layers:
        why = f" ({len(skipped)} skipped: {skipped[0].name} {skipped[0].reason})" if skipped else ""
        if n_quant and not skipped:
            why = " (QOperator-format quantized models, QLinearConv/ConvInteger, are not supported: use a QDQ model)"
        raise ModelError(f"{where} has no weighted layers (Conv, ConvTranspose, Gemm, MatMul with a constant operand){why}")
    return PreparedModel(
        model=proto,
        source=read.source,
        input_name=inp.name,
        input_shape=shape,
        output_name=output_name,
        layers=layers,
        skipped=skipped,
        shapes=MappingProxyType(dict(shapes)),
        quantized_nodes=n_quant,
        activation_qdq_pairs=record.activation_pairs,
        fixed_batch=declared_batch(inp),
        input_dtype=dtype,
        outputs=outputs,
        opset=default_opset(proto),
        source_opset=source_opset,
        changed_by=log.changed_by,
    )
