"""Export a PyTorch classifier to ONNX the way laqonnx expects its inputs.

Input ``input`` (float32, ``(N, C, H, W)``, dynamic batch ``N``), output ``logits`` ``(N, classes)``,
eval mode (the TorchScript exporter folds BatchNormalization into the preceding convolutions),
opset 17. ``dynamo=False``: the dynamo exporter needs onnxscript, which laqonnx does not depend on.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from typing import Sequence

import onnx
from onnx import numpy_helper

from .._util.io import save_model
from ..errors import OptionError, require

__all__ = ["export_onnx", "INPUT_NAME", "OUTPUT_NAME"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(
    module: object,
    path: str | os.PathLike[str] | None,
    input_shape: Sequence[int],
    opset: int = 17,
) -> onnx.ModelProto:
    """Export ``module`` (an ``nn.Module``) to ONNX and return the checked ``ModelProto``.

    Args:
        module: the classifier; exported in eval mode, its training flag is restored afterwards.
        path: where to write the model atomically (``laqonnx._util.io.save_model``), or None.
        input_shape: ``(C, H, W)`` or ``(N, C, H, W)``; the batch axis is dynamic either way.
        opset: ONNX opset (17 by default).
    """
    torch = require("torch", "robustness")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or min(shape) < 1:
        raise OptionError(f"input_shape must be (C, H, W) or (N, C, H, W) with positive sizes, got {tuple(input_shape)}")
    dummy = torch.zeros(shape, dtype=torch.float32)
    was_training = bool(module.training)
    module.eval()
    buffer = io.BytesIO()
    onnx_logger = logging.getLogger("torch.onnx")
    old_level = onnx_logger.level
    try:
        onnx_logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
            torch.onnx.export(
                module,
                (dummy,),
                buffer,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        onnx_logger.setLevel(old_level)
        module.train(was_training)
    model = _constants_to_initializers(onnx.load_from_string(buffer.getvalue()))
    onnx.checker.check_model(model)
    if path is not None:
        save_model(model, path)
    return model


def _constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn the exporter's ``Constant`` nodes and ``Identity`` copies of initializers (it dedups
    equal folded biases that way) into plain initializers, so every Conv/Gemm weight and bias,
    and every Clip bound, is an initializer the layer walk can read directly."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
        elif node.op_type == "Identity" and node.input[0] in inits:
            tensor = numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]), node.output[0])
        else:
            keep.append(node)
            continue
        graph.initializer.append(tensor)
        inits[tensor.name] = tensor
    del graph.node[:]
    graph.node.extend(keep)
    return model
