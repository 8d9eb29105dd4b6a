"""Pass: fold an inference-mode BatchNormalization into the Conv that feeds it.

``Conv(x, W, b) -> BatchNormalization(gamma, beta, mean, var, eps)`` becomes one
``Conv(x, W * s, (b - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)`` per output channel
(computed in float64, stored in the weight's dtype), when the Conv output feeds only the BN, every
parameter is an initializer, and the Conv's weight is not in ``keep`` (dequantized weights of a
quantized model stay as they are: the BN rule of the Lipschitz bound covers them).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import numpy_helper

from .passes import ProtoPass

__all__ = ["FoldBatchNorm", "fold_batchnorm"]


def fold_batchnorm(graph: onnx.GraphProto, keep: Collection[str] = frozenset()) -> int:
    """Fold every foldable BatchNormalization of ``graph`` in place; return how many were folded."""
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    removed: list[onnx.NodeProto] = []
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.output) != 1:
            continue
        if any(a.name == "training_mode" and a.i for a in bn.attribute):
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(conv.input) < 2:
            continue
        if consumers.get(conv.output[0], 0) != 1 or conv.output[0] in graph_outputs:
            continue
        params = bn.input[1:5]
        if not all(p in inits for p in params) or conv.input[1] not in inits or conv.input[1] in keep:
            continue
        if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits:
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + eps)
        w_init = inits[conv.input[1]]
        w = numpy_helper.to_array(w_init)
        bias = (
            numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(w.shape[0])
        )
        w_new = (w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
        b_new = ((bias - mean) * scale + beta).astype(w.dtype)
        w_name = conv.input[1] if consumers.get(conv.input[1], 0) == 1 else f"{conv.input[1]}_{bn.name}_folded"
        b_name = f"{conv.name or conv.output[0]}_bias_folded"
        while b_name in inits:
            b_name += "_"
        for name, arr in ((w_name, w_new), (b_name, b_new)):
            if name in inits:
                inits[name].CopyFrom(numpy_helper.from_array(arr, name))
            else:
                t = numpy_helper.from_array(arr, name)
                graph.initializer.append(t)
                inits[name] = graph.initializer[-1]
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[1], conv.input[2] = w_name, b_name
        conv.output[0] = bn.output[0]
        removed.append(bn)
    for bn in removed:
        graph.node.remove(bn)
    if removed:  # drop initializers nothing uses any more (the old BN params, unfolded weights)
        used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        del graph.value_info[:]
    return len(removed)


class FoldBatchNorm(ProtoPass):
    """The pass: :func:`fold_batchnorm` on the main graph. ``keep`` may be filled in by an earlier pass."""

    name = "fold-batchnorm"

    def __init__(self, keep: Collection[str] = frozenset()) -> None:
        self.keep = keep

    def run(self, model: onnx.ModelProto) -> bool:
        return fold_batchnorm(model.graph, self.keep) > 0
