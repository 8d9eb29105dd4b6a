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

__all__ = ["activation_sources", "output_producers", "FOLDED_ACTIVATIONS"]

# removable activations: onnxruntime folds them into the QuantizeLinear after the op before them
FOLDED_ACTIVATIONS = frozenset({"Relu", "Clip"})


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


def output_producers(pm: PreparedModel) -> dict[str, tuple[str, ...]]:
    """tensor -> the layers whose output QuantizeLinear is that tensor's: a layer's output, or the
    output of the removable activations (Relu, Clip) that are its only consumers. onnxruntime fuses
    an int8 layer only when that QuantizeLinear is 8-bit too, so a 16-bit activation there runs the
    layer unfused (:meth:`laqonnx.quant.latency_costs.LatencyTable.unfused_ms`)."""
    consumers: dict[str, list] = {}
    for node in pm.model.graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    out: dict[str, list[str]] = {}
    for layer in pm.layers:
        tensor = layer.output
        seen = {tensor}
        while len(consumers.get(tensor, ())) == 1 and consumers[tensor][0].op_type in FOLDED_ACTIVATIONS:
            nxt = consumers[tensor][0].output[0]
            if nxt in seen:
                break
            seen.add(nxt)
            tensor = nxt
        out.setdefault(tensor, []).append(layer.name)
    return {t: tuple(names) for t, names in out.items()}
