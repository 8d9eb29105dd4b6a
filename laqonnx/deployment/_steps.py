"""Custom steps for onnxruntime-extensions' pre/post-processing toolkit, used by
:func:`laqonnx.deployment.build_deployed_model`.

Each class is a ``Step`` of ``onnxruntime_extensions.tools.pre_post_processing``: it returns a small
standard-ONNX graph that the toolkit's ``PrePostProcessor`` prefixes and merges like its own steps.
They fill gaps in the toolkit (version 0.15); the JPEG/PNG guard, :class:`RequireEncodedImage`, is
in :mod:`laqonnx.deployment._jpeg`:

- :class:`RequireThreeChannels` refuses images the decoder returns with other than 3 channels.
- :class:`BGRToGray` is PIL's ``convert("L")`` exactly: ``(19595 R + 38470 G + 7471 B + 32768) >> 16``.
- :class:`NormalizeChannels` is ``(x - mean) / std`` for any channel count (the toolkit's ``Normalize``
  handles exactly 3).
- :class:`TopKClasses` emits the top-1 index, the top-k scores and indices, and optionally labels.

A refusal is a ``Reshape`` that fails at run time (:func:`_refuse_unless`), named so that
onnxruntime's error message says why.

This module imports onnxruntime-extensions at import time: import it only after
``laqonnx.errors.require("onnxruntime_extensions", "deploy")``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime_extensions.tools.pre_post_processing import Step

__all__ = ["RequireThreeChannels", "BGRToGray", "NormalizeChannels", "TopKClasses"]


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_value"))


def _dims(tensor_type: onnx.TypeProto.Tensor) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


class _GraphStep(Step):
    """A step whose graph is built with ``onnx.helper`` (node names allowed, unlike the text parser)."""

    def _io(self, graph: onnx.GraphProto, index: int = 0) -> tuple[int, list[int | str | None]]:
        t = self._input_tensor_type(graph, index)
        return t.elem_type, _dims(t)

    def _graph(
        self, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
    ) -> onnx.GraphProto:
        return helper.make_graph(nodes, self.name, inputs, outputs)


def _refuse_unless(ok_int64: str, data: str, rank: int, out: str, reason: str) -> list[onnx.NodeProto]:
    """Nodes making ``out`` = ``data`` when the int64 scalar ``ok_int64`` is 1, a run-time error when 0.

    When refused, the shape fed to ``Reshape`` gets one more element on its last axis, which can never
    match the element count; onnxruntime then raises, naming the ``Reshape`` node, whose name is ``reason``.
    """
    last = np.zeros(rank, np.int64)
    last[-1] = 1
    return [
        _const(f"{out}_one", np.array(1, np.int64)),
        _const(f"{out}_last_axis", last),
        helper.make_node("Sub", [f"{out}_one", ok_int64], [f"{out}_bad"]),
        helper.make_node("Mul", [f"{out}_last_axis", f"{out}_bad"], [f"{out}_delta"]),
        helper.make_node("Shape", [data], [f"{out}_shape"]),
        helper.make_node("Add", [f"{out}_shape", f"{out}_delta"], [f"{out}_target"]),
        helper.make_node("Reshape", [data, f"{out}_target"], [out], name=reason),
    ]


class RequireThreeChannels(_GraphStep):
    """Pass a decoded ``(H, W, C)`` image through if ``C == 3``, else fail at run time."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(["bgr"], ["checked_bgr"], name)

    def _create_graph_for_step(self, graph: onnx.GraphProto, onnx_opset: int) -> onnx.GraphProto:
        elem, dims = self._io(graph)
        x, y = self.input_names[0], self.output_names[0]
        nodes = [
            helper.make_node("Shape", [x], ["shape"]),
            _const("axis2", np.array(2, np.int64)),
            _const("three", np.array(3, np.int64)),
            helper.make_node("Gather", ["shape", "axis2"], ["channels"]),
            helper.make_node("Equal", ["channels", "three"], ["is3"]),
            helper.make_node("Cast", ["is3"], ["ok"], to=TensorProto.INT64),
            *_refuse_unless(
                "ok", x, 3, y, "refused:_image_did_not_decode_to_3_channels_(grayscale/CMYK_JPEG_unsupported_by_decoder)"
            ),
        ]
        return self._graph(
            nodes,
            [helper.make_tensor_value_info(x, elem, dims)],
            [helper.make_tensor_value_info(y, elem, dims)],
        )


class BGRToGray(_GraphStep):
    """uint8 ``(H, W, 3)`` BGR to uint8 ``(H, W, 1)`` luma, bit-exact with PIL's ``convert("L")``."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(["bgr"], ["gray"], name)

    def _create_graph_for_step(self, graph: onnx.GraphProto, onnx_opset: int) -> onnx.GraphProto:
        elem, dims = self._io(graph)
        if elem != TensorProto.UINT8 or len(dims) != 3:
            raise ValueError("BGRToGray needs uint8 (H, W, 3) input")
        x, y = self.input_names[0], self.output_names[0]
        # one row at a time (Scan over H): int32 temporaries of the whole image would cost 24 bytes a
        # pixel (a 40 MP image: ~1 GB); per row they are a few kB, and the output is 1 byte a pixel
        body = [
            helper.make_node("Cast", ["row"], ["row_i"], to=TensorProto.INT32),
            _const("weights_bgr", np.array([7471, 38470, 19595], np.int32)),  # ITU-R 601-2 in 1/65536 units
            _const("axes", np.array([-1], np.int64)),
            _const("half", np.array(32768, np.int32)),
            _const("unit", np.array(65536, np.int32)),
            helper.make_node("Mul", ["row_i", "weights_bgr"], ["weighted"]),
            helper.make_node("ReduceSum", ["weighted", "axes"], ["summed"], keepdims=1),
            helper.make_node("Add", ["summed", "half"], ["rounded"]),
            helper.make_node("Div", ["rounded", "unit"], ["luma"]),  # non-negative: truncation == >> 16
            helper.make_node("Cast", ["luma"], ["gray_row"], to=TensorProto.UINT8),
        ]
        row_graph = helper.make_graph(body, "bgr_to_gray_row",
                                      [helper.make_tensor_value_info("row", TensorProto.UINT8, [dims[1], 3])],
                                      [helper.make_tensor_value_info("gray_row", TensorProto.UINT8, [dims[1], 1])])
        nodes = [helper.make_node("Scan", [x], [y], body=row_graph, num_scan_inputs=1)]
        return self._graph(
            nodes,
            [helper.make_tensor_value_info(x, elem, dims)],
            [helper.make_tensor_value_info(y, TensorProto.UINT8, [dims[0], dims[1], 1])],
        )


class NormalizeChannels(_GraphStep):
    """Float ``(C, H, W)``: ``(x - mean[c]) / std[c]``, computed in float32 like the toolkit's ``Normalize``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], name: str | None = None) -> None:
        super().__init__(["data"], ["normalized"], name)
        self._mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
        self._std = np.asarray(std, np.float32).reshape(-1, 1, 1)

    def _create_graph_for_step(self, graph: onnx.GraphProto, onnx_opset: int) -> onnx.GraphProto:
        elem, dims = self._io(graph)
        x, y = self.input_names[0], self.output_names[0]
        nodes = [
            _const("mean", self._mean),
            _const("std", self._std),
            helper.make_node("Sub", [x, "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], [y]),
        ]
        return self._graph(
            nodes,
            [helper.make_tensor_value_info(x, elem, dims)],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, dims)],
        )


class TopKClasses(_GraphStep):
    """Float ``(K,)`` scores to ``class_index`` (int64 scalar), ``topk_scores``, ``topk_indices`` [, ``topk_labels``]."""

    def __init__(self, k: int, labels: Sequence[str] | None = None, name: str | None = None) -> None:
        outputs = ["class_index", "topk_scores", "topk_indices"] + (["topk_labels"] if labels else [])
        super().__init__(["scores"], outputs, name)
        self._k = k
        self._labels = list(labels) if labels else None

    def _create_graph_for_step(self, graph: onnx.GraphProto, onnx_opset: int) -> onnx.GraphProto:
        elem, dims = self._io(graph)
        x = self.input_names[0]
        top, scores, indices = self.output_names[:3]
        nodes = [
            _const("k", np.array([self._k], np.int64)),
            _const("first", np.array(0, np.int64)),
            helper.make_node("TopK", [x, "k"], [scores, indices], axis=-1, largest=1, sorted=1),
            helper.make_node("Gather", [indices, "first"], [top], axis=0),
        ]
        outputs = [
            helper.make_tensor_value_info(top, TensorProto.INT64, []),
            helper.make_tensor_value_info(scores, TensorProto.FLOAT, [self._k]),
            helper.make_tensor_value_info(indices, TensorProto.INT64, [self._k]),
        ]
        if self._labels:
            table = helper.make_tensor("label_table_value", TensorProto.STRING, [len(self._labels)],
                                       [s.encode("utf-8") for s in self._labels])
            nodes += [
                helper.make_node("Constant", [], ["label_table"], value=table),
                helper.make_node("Gather", ["label_table", indices], [self.output_names[3]], axis=0),
            ]
            outputs.append(helper.make_tensor_value_info(self.output_names[3], TensorProto.STRING, [self._k]))
        return self._graph(nodes, [helper.make_tensor_value_info(x, elem, dims)], outputs)
