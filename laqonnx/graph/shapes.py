"""Shapes: the concrete input shape, every tensor's shape at that input, the declared batch and dtype."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx

from ..errors import ModelError
from .passes import one_line

__all__ = ["resolve_input_shape", "concrete_shapes", "with_outputs", "declared_batch", "input_dtype"]


def _declared_dims(inp: onnx.ValueInfoProto) -> list[int | str] | None:
    """The input's declared dims (int when fixed, the symbol or '?' when not); None without a shape."""
    ttype = inp.type.tensor_type
    if not inp.type.HasField("tensor_type") or not ttype.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?") for d in ttype.shape.dim]


def declared_batch(inp: onnx.ValueInfoProto) -> int | None:
    """The batch size (axis 0) ``inp`` declares, or None when it is dynamic or undeclared."""
    dims = _declared_dims(inp)
    return dims[0] if dims and isinstance(dims[0], int) else None


def input_dtype(inp: onnx.ValueInfoProto) -> np.dtype:
    """The numpy dtype of a tensor input (ModelError for a non-tensor or untyped input)."""
    if not inp.type.HasField("tensor_type") or inp.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
        raise ModelError(f"model input {inp.name!r} is not a typed tensor")
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))


def resolve_input_shape(inp: onnx.ValueInfoProto, given: Sequence[int] | None) -> tuple[int, ...]:
    """The concrete batch-1 input shape from the model's declaration and the user's ``given``."""
    dims = _declared_dims(inp)
    if dims is None:
        if given is None:
            raise ModelError(f"input {inp.name!r} has no declared shape: pass an input shape, e.g. 1,3,224,224")
        return (1, *(int(d) for d in list(given)[1:]))
    declared = "[" + ",".join(str(d) for d in dims) + "]"
    if given is not None:
        given = [int(d) for d in given]
        if len(given) != len(dims):
            raise ModelError(
                f"input shape {tuple(given)} has rank {len(given)} but model input {inp.name!r} is {declared} (rank {len(dims)})"
            )
        if any(d <= 0 for d in given):
            raise ModelError(f"input shape {tuple(given)} has a non-positive dimension")
        for axis, (g, d) in enumerate(zip(given, dims)):
            if axis > 0 and isinstance(d, int) and g != d:
                raise ModelError(
                    f"input shape {tuple(given)} contradicts model input {inp.name!r} {declared}: axis {axis} is {g}, the model says {d}"
                )
        return (1, *given[1:])
    out = [1]
    for axis, d in enumerate(dims[1:], start=1):
        if not isinstance(d, int):
            raise ModelError(
                f"model input {inp.name!r} {declared} has a dynamic size {d!r} on axis {axis}: pass an input shape (--input-shape), e.g. 1,3,224,224"
            )
        out.append(d)
    return tuple(out)


def _shape_map(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    g = proto.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
            if all(d is not None for d in dims):
                out[vi.name] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    return out


def concrete_shapes(
    proto: onnx.ModelProto, input_name: str, shape: tuple[int, ...], dtype: np.dtype | type = np.float32
) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors at the concrete input ``shape``: onnx shape inference, then onnxruntime
    (on zeros of ``dtype``) for what inference leaves unknown."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    del fixed.graph.value_info[:]
    for vi in fixed.graph.input:
        if vi.name == input_name:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in shape:
                dims.add().dim_value = d
    for vi in fixed.graph.output:  # the batch may be declared as a fixed size other than 1
        if vi.type.tensor_type.HasField("shape"):
            vi.type.tensor_type.ClearField("shape")
    try:
        fixed = onnx.shape_inference.infer_shapes(fixed, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelError(f"input shape {shape} does not fit the model: {one_line(exc)}") from exc
    shapes = _shape_map(fixed)
    init_names = {t.name for t in fixed.graph.initializer}
    missing = [o for n in fixed.graph.node for o in n.output if o and o not in shapes and o not in init_names]
    if missing:
        shapes.update(_ort_shapes(fixed, input_name, np.zeros(shape, dtype=dtype), missing))
    return shapes


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the tensors ``names`` added as graph outputs (so onnxruntime
    returns intermediate activations); ``model`` is not modified."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    return out


def _ort_shapes(proto: onnx.ModelProto, input_name: str, x: np.ndarray, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes that shape inference could not resolve, by running onnxruntime once on ``x``."""
    from .session import open_session

    try:
        sess = open_session(with_outputs(proto, names), optimized=False)
        outs = sess.run(names, {input_name: x})
    except Exception:  # shapes stay unknown; later stages fall back to shape-free bounds
        return {}
    return {n: tuple(int(d) for d in np.shape(v)) for n, v in zip(names, outs)}
