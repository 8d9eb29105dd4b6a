"""The Resize rule: nearest, linear and cubic resizing are separable linear maps (the N-D map is
the Kronecker product of one 1-D map per axis), so the operator norm is the product of the
per-axis spectral norms. Each 1-D matrix is read from onnxruntime itself, by resizing the basis
vectors of that axis alone with the node's own attributes and scale (or size): the bound is the
operator's exact norm for the constant scales/sizes of the node (e.g. nearest 2x2 upsampling: 2).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .registry import NoRule, RuleContext, attr, register_rule

__all__ = ["resize_axis_matrix"]

_KEPT = ("mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a", "exclude_outside", "antialias")


def _full(values: np.ndarray, axes, rank: int, fill: float) -> list[float]:
    out = [fill] * rank
    for j, a in enumerate(axes if axes is not None else range(rank)):
        out[a + rank if a < 0 else a] = float(values[j])
    return out


def resize_axis_matrix(node: onnx.NodeProto, rank: int, axis: int, n: int, scale: float | None, size: int | None,
                       opset: int) -> np.ndarray:
    """The (m, n) matrix of ``node``'s resize along ``axis`` of an input of size ``n`` there,
    run in onnxruntime on the n basis vectors (batched along axis 0)."""
    import onnxruntime as ort

    shape = [1] * rank
    shape[0], shape[axis] = n, n
    kept = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name in _KEPT}
    inits = [numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
    if size is None:
        scales = [1.0] * rank
        scales[axis] = scale
        inits.append(numpy_helper.from_array(np.asarray(scales, np.float32), "scales"))
        ins = ["x", "roi", "scales"]
    else:
        sizes = list(shape)
        sizes[axis] = size
        inits.append(numpy_helper.from_array(np.asarray(sizes, np.int64), "sizes"))
        ins = ["x", "roi", "", "sizes"]
    graph = helper.make_graph([helper.make_node("Resize", ins, ["y"], **kept)], "resize_axis",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(13, opset))])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    eye = np.eye(n, dtype=np.float32).reshape(shape)
    y = session.run(None, {"x": eye})[0]
    return np.moveaxis(y, axis, 1).reshape(n, -1).T.astype(np.float64)  # rows: outputs, columns: basis inputs


@register_rule("Resize")
def _resize(node, L, ctx: RuleContext):
    if any(L[1:]):
        return NoRule("Resize with perturbed roi/scales/sizes")
    if attr(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        return NoRule("Resize in tf_crop_and_resize mode")
    if attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        return NoRule("Resize with keep_aspect_ratio_policy other than stretch")
    shape = ctx.shape(node.input[0])
    if shape is None:
        return NoRule("Resize: input shape unknown")
    rank, axes = len(shape), attr(node, "axes")
    scales = ctx.const(node.input[2]) if len(node.input) > 2 else ctx.const(node.input[1]) if len(node.input) == 2 else None
    sizes = ctx.const(node.input[3]) if len(node.input) > 3 else None
    if scales is not None and scales.size:
        per_axis, sized = _full(scales, axes, rank, 1.0), False
    elif sizes is not None and sizes.size:
        per_axis, sized = [v or shape[a] for a, v in enumerate(_full(sizes, axes, rank, 0.0))], True
    else:
        return NoRule("Resize with non-constant scales/sizes")
    key = ("resize", node.name)
    if key not in ctx.cache:
        norm = 1.0
        for a in range(rank):
            identity = per_axis[a] == (shape[a] if sized else 1.0)
            if identity and attr(node, "coordinate_transformation_mode", "") != "tf_half_pixel_for_nn":
                continue
            if a == 0:
                return NoRule("Resize along the batch axis")
            w = resize_axis_matrix(node, rank, a, shape[a], None if sized else per_axis[a],
                                   int(per_axis[a]) if sized else None, ctx.pm.opset or 13)
            norm *= float(np.linalg.norm(w, 2)) if w.size else 0.0
        ctx.cache[key] = norm
    return ctx.cache[key] * L[0] if math.isfinite(ctx.cache[key]) else NoRule("Resize: no finite norm")
