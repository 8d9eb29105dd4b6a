"""The metric's terms without torch: each layer's own output error, measured with onnxruntime.

Without the differentiable mirror there are no local gains to the logits, so every gain is taken
as the identity at the layer's output: a weight setting scores ``E ||T[dW] a||^2`` (the error it
adds to the layer's output) and an activation setting of tensor ``t`` scores
``sum_l E ||T_l e_t||^2`` over the layers that read ``t``; the adversarial terms are the same
differences over (clean, adversarial) pairs as in :mod:`laqonnx.quant.sensitivity`. The layer
inputs come from one onnxruntime pass over the metric examples; each layer's linear part runs as a
one-node onnxruntime model whose weight is an input.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from ..graph import Layer, PreparedModel, with_outputs
from .sensitivity import Sensitivities

__all__ = ["layer_errors"]


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _linear_model(pm: PreparedModel, layer: Layer) -> onnx.ModelProto:
    """One node: the layer without its bias, with the activation and the weight as inputs."""
    node = next(n for n in pm.model.graph.node if n.name == layer.name)
    widx = 0 if layer.op_type == "MatMul" and layer.attrs.get("weight_input", 1) == 0 else 1
    ins = ["w", "a"] if widx == 0 else ["a", "w"]
    attrs = [a for a in node.attribute if not (layer.op_type == "Gemm" and a.name == "beta")]
    new = helper.make_node(layer.op_type, ins, ["y"], name="linear")
    new.attribute.extend(attrs)
    f = onnx.TensorProto.FLOAT
    graph = helper.make_graph([new], "linear", [helper.make_tensor_value_info("a", f, None),
                                                helper.make_tensor_value_info("w", f, None)],
                              [helper.make_tensor_value_info("y", f, None)])
    opset = next(o.version for o in pm.model.opset_import if o.domain in ("", "ai.onnx"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(pm.model.ir_version, 10) or 8
    return model


def _errors(v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    scale, zp, lo, hi = (rows[:, i].reshape((-1,) + (1,) * v.ndim).astype(np.float32) for i in range(4))
    q = np.clip(np.rint(v[None] / scale) + zp, lo, hi)
    return (q - zp) * scale - v[None]


def layer_errors(
    pm: PreparedModel,
    weight_deltas: Mapping[str, np.ndarray],
    act_params: Mapping[str, np.ndarray],
    clean: np.ndarray,
    adversarial: np.ndarray | None = None,
    sources: Mapping[str, str] | None = None,
) -> Sensitivities:
    """The terms of every candidate with identity gains (see the module doc); same layout as
    :func:`laqonnx.quant.sensitivity.mirror_sensitivities`."""
    wanted = list(dict.fromkeys(layer.input for layer in pm.layers if layer.input != pm.input_name))
    probe = _session(with_outputs(pm.model, wanted))
    step = pm.fixed_batch if getattr(pm, "fixed_batch", None) else len(clean)

    def inputs(x: np.ndarray) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {t: [] for t in wanted}
        for i in range(0, len(x), step):
            for t, v in zip(wanted, probe.run(wanted, {pm.input_name: x[i:i + step]})):
                parts[t].append(v)
        out = {t: np.concatenate(v) for t, v in parts.items()}
        out[pm.input_name] = x
        return out

    sets = [inputs(clean)] + ([inputs(adversarial)] if adversarial is not None else [])
    sessions = {layer.name: _session(_linear_model(pm, layer)) for layer in pm.layers}

    def apply(layer: Layer, a: np.ndarray, w: np.ndarray) -> np.ndarray:
        return sessions[layer.name].run(["y"], {"a": np.ascontiguousarray(a, np.float32), "w": np.ascontiguousarray(w, np.float32)})[0]

    n = len(clean)
    wc, wa, ac, aa = {}, {}, {}, {}
    for layer in pm.layers:
        d = weight_deltas[layer.name]
        outs = [np.stack([apply(layer, s[layer.input], d[k]) for k in range(len(d))]) if len(d) else None for s in sets]
        wc[layer.name] = np.zeros(0) if outs[0] is None else (outs[0] ** 2).reshape(len(d), -1).sum(1) / n
        if adversarial is not None:
            wa[layer.name] = np.zeros(0) if outs[0] is None else ((outs[1] - outs[0]) ** 2).reshape(len(d), -1).sum(1) / n
    sources = sources or {}
    for t, rows in act_params.items():
        readers = [layer for layer in pm.layers if sources.get(layer.input, layer.input) == t]
        c = np.zeros(len(rows))
        a = np.zeros(len(rows))
        for layer in readers:  # the error at the reader's input, with the source's parameters
            errs = [_errors(s[layer.input], rows) for s in sets]
            w = pm.weight(layer)
            yc = np.stack([apply(layer, errs[0][k], w) for k in range(len(rows))])
            c += (yc ** 2).reshape(len(rows), -1).sum(1) / n
            if adversarial is not None:
                ya = np.stack([apply(layer, errs[1][k], w) for k in range(len(rows))])
                a += ((ya - yc) ** 2).reshape(len(rows), -1).sum(1) / n
        ac[t], aa[t] = c, a
    return Sensitivities(wc, wa if adversarial is not None else None, ac, aa if adversarial is not None else None,
                         projections=0, exact=False, examples=n)
