"""Passes on constants: fold constant subgraphs (onnxscript), lift Constant nodes to initializers (onnx-ir).

Folding evaluates every node whose inputs are all constant and replaces it by its value: torch's
``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` flatten on a model whose batch is fixed
becomes one constant shape, a weight computed from constants becomes a constant. Quantization nodes
are kept (onnxscript keeps QuantizeLinear/DequantizeLinear by default); the QDQ pass reads them.
Lifting turns every ``Constant`` node (paddle2onnx stores every weight that way) into an
initializer of the same name, so the weighted-layer walk sees the weights.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes import common as ir_common

from .passes import IRPass

__all__ = ["FoldConstants", "fold_constants", "lift_constants", "FOLD_SIZE_LIMIT"]

# largest tensor (elements) folding reads or writes: a classifier's weights, not blown-up activations
FOLD_SIZE_LIMIT = 1 << 22


class FoldConstants(ir.passes.InPlacePass):
    """``onnxscript.optimizer.fold_constants_ir`` with per-node shape inference, up to ``size_limit`` elements."""

    def __init__(self, size_limit: int = FOLD_SIZE_LIMIT) -> None:
        super().__init__()
        if size_limit < 1:
            raise ValueError(f"size_limit must be positive, got {size_limit}")
        self.size_limit = size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = onnxscript.optimizer.fold_constants_ir(
            model, onnx_shape_inference=True, input_size_limit=self.size_limit, output_size_limit=self.size_limit
        )
        return ir.passes.PassResult(model, bool(result.modified))


def fold_constants(size_limit: int = FOLD_SIZE_LIMIT) -> IRPass:
    """The folding pass under its intake name."""
    return IRPass("fold-constants", FoldConstants(size_limit))


def lift_constants() -> IRPass:
    """Every Constant node (of any size or attribute kind) that is not a graph output becomes an initializer."""
    return IRPass("lift-constants", ir_common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0))
