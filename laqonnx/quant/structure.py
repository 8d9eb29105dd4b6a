"""Which tensor's quantization parameters each layer's input activation really gets.

onnxruntime's QDQ quantizer does not give every tensor its own range: the output of a "direct"
op (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice, AveragePool, MaxPool, Gather, Split,
...) is quantized with its input's scale and zero point, and a removable activation (Relu, Clip)
hands its range to the op before it. So the activation setting chosen for a layer whose input is,
say, the output of a Flatten takes effect on the tensor before the Flatten. :func:`activation_sources`
finds, for every layer input, the tensor whose range onnxruntime uses, by lowering the model once
(placeholder ranges and int8 weights) and reading the DequantizeLinear that feeds each layer: its
scale initializer is named after the tensor the parameters were computed for. The metric measures
an activation candidate's error at that source tensor, and the plan sets the range there.
"""

from __future__ import annotations

from collections.abc import Sequence


from ..graph import PreparedModel

__all__ = ["activation_sources"]


def activation_sources(pm: PreparedModel, tensors: Sequence[str]) -> dict[str, str]:
    """layer input tensor -> the tensor whose quantization parameters onnxruntime gives it (itself if
    nothing else, or if the structure cannot be read)."""
    from .lower import LoweringSpec, lower
    from .numerics import WeightQuant, weight_qparams

    inputs = list(dict.fromkeys(layer.input for layer in pm.layers))
    try:
        weights = {layer.weight: weight_qparams(pm.weight(layer), WeightQuant()) for layer in pm.layers}
        probe = lower(pm.model, LoweringSpec(weights=weights, ranges={t: (0.0, 1.0) for t in tensors}))
    except Exception:  # the real lowering reports its own errors; here we only lose the refinement
        return {t: t for t in inputs}
    producer = {o: n for n in probe.graph.node for o in n.output}
    known = set(tensors)
    out: dict[str, str] = {}
    for layer in pm.layers:
        node = next((n for n in probe.graph.node if n.name == layer.name), None)
        source = layer.input
        if node is not None:
            act = node.input[1 if layer.op_type == "MatMul" and layer.attrs.get("weight_input", 1) == 0 else 0]
            dq = producer.get(act)
            if dq is not None and dq.op_type == "DequantizeLinear" and len(dq.input) > 1:
                name = dq.input[1]
                if name.endswith("_scale") and name[: -len("_scale")] in known:
                    source = name[: -len("_scale")]
        out.setdefault(layer.input, source)
    return out


