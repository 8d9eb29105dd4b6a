"""Graph stage: read a model made by anyone, prepare a float working copy, walk its weighted layers.

:func:`load_model` turns a path or ``ModelProto`` into a :class:`PreparedModel`: the float working
copy every later stage uses, its single input and its outputs, and the weighted layers (Conv,
ConvTranspose, Gemm, MatMul with a constant operand) in topological order, each with its input
shape at batch 1. The working copy computes what the model as read computes, with the same input
and output names and batch size.

The intake (:func:`laqonnx.graph.intake.intake_passes`) is a sequence of small passes run in order
by :func:`laqonnx.graph.passes.run_passes`; each says whether it changed the model
(``PreparedModel.changed_by`` lists those that did):

0. read (:func:`read_model`): the file with its external data, or a copy of the ``ModelProto``;
   the input, outputs and input shape are validated on the model as read;
1. ``topological-sort`` (onnx-ir): keras2onnx writes unsorted graphs, which onnx.checker refuses;
2. ``name-nodes`` (onnx-ir NameFixPass): unnamed nodes become ``<op_type>_<index>``, numbered as
   the sorted user graph; duplicate names are made unique;
3. ``check``: onnx.checker;
4. ``upgrade-opset``: onnx's version converter lifts opset < 13 to 13 (onnxruntime's QDQ
   quantizer writes ``axis`` on DequantizeLinear, which older opsets refuse);
5. ``initializers-off-inputs`` (onnx-ir): initializers listed as graph inputs (IR < 4) become constants;
6. ``fold-constants`` (onnxscript): constant subgraphs become constants (torch's Shape/Gather
   flatten on a fixed-batch model, weights computed from constants);
7. ``lift-constants`` (onnx-ir): Constant nodes become initializers (paddle2onnx weights);
8. ``eliminate-identity`` (onnx-ir): Identity nodes go (graph output names are kept);
9. ``strip-qdq``: a quantized (QDQ) model is read as its dequantized float equivalent: a
   ``DequantizeLinear(initializer x, scale[, zero_point])`` becomes the float initializer
   ``(x - zero_point) * scale`` (as ONNX computes it) and each layer records its weight's bits and
   quantization parameters; an activation ``QuantizeLinear -> DequantizeLinear`` pair is removed
   (identity: rounding is not Lipschitz, so the bound covers the dequantized weights without
   activation rounding). ``load_model(..., allow_quantized=False)`` refuses quantized models;
10. ``fold-batchnorm``: inference BatchNormalization folded into the preceding Conv (not into
    dequantized weights);
11. ``name-nodes`` again, for nodes the converter or the folder added;
12. ``remove-unused`` (onnx-ir): nodes and initializers no output depends on.

Then onnx shape inference on the working copy, the concrete shapes at the batch-1 input
(:func:`concrete_shapes`: shape inference, onnxruntime for the rest) and the weighted-layer walk
(:mod:`laqonnx.graph.walk`).

Also here: :func:`open_session` / :func:`run_batched` (the one way to run onnxruntime, fixed-batch
aware) and :func:`remove_unused` (hygiene for the models laqonnx writes).
"""

from __future__ import annotations

from .intake import intake_passes, load_model
from .io import ReadModel, read_model
from .model import Layer, PreparedModel, SkippedNode, constant_values
from .passes import PassLog, PassResult, run_passes
from .session import open_session, run_batched
from .shapes import concrete_shapes, declared_batch, input_dtype, resolve_input_shape, with_outputs
from .structure import remove_unused
from .walk import WEIGHTED_OPS

__all__ = [
    "load_model", "intake_passes", "PreparedModel", "Layer", "SkippedNode", "WEIGHTED_OPS", "with_outputs",
    "resolve_input_shape", "concrete_shapes", "declared_batch", "input_dtype", "constant_values",
    "read_model", "ReadModel", "open_session", "run_batched", "remove_unused", "run_passes", "PassResult",
    "PassLog",
]
