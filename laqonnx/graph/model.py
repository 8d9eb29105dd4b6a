"""What the intake produces: weighted layers, skipped nodes, and the prepared model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..quant.numerics import QParams

__all__ = ["Layer", "SkippedNode", "PreparedModel", "constant_values"]


@dataclass(frozen=True)
class Layer:
    """One weighted node: a linear operator (plus bias) with a constant weight."""

    name: str
    op_type: str
    weight: str
    weight_shape: tuple[int, ...]
    bias: str | None
    input: str
    output: str
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    attrs: Mapping[str, Any] = field(hash=False)
    channel_axis: int
    index: int
    weight_bits: int | None = None  # None: a float weight
    weight_qparams: QParams | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def weight_quantized(self) -> bool:
        """True when the weight was stored quantized (a DequantizeLinear of initializers)."""
        return self.weight_bits is not None


@dataclass(frozen=True)
class SkippedNode:
    """A node of a weighted op type that is not analysed, and why."""

    name: str
    op_type: str
    reason: str


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The value of every ``Constant`` node (``value`` attribute) of the main graph, by output name."""
    out: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


@dataclass(frozen=True)
class PreparedModel:
    """The float working copy every later stage uses, its signature, and its weighted layers.

    ``model`` computes what the model as read computes (same input and output names, same batch
    size) after the intake passes (see :mod:`laqonnx.graph`). ``input_shape`` is the concrete input
    shape at batch 1; ``fixed_batch`` the batch size the input declares (None when dynamic);
    ``outputs`` all graph outputs in order and ``output_name`` the one analysed (the first unless
    ``load_model(..., output=...)`` chose another). ``opset`` is the working copy's default-domain
    opset, ``source_opset`` the model's as read; ``changed_by`` names the passes that changed it.
    """

    model: onnx.ModelProto = field(repr=False, compare=False)
    source: str | None
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    layers: tuple[Layer, ...]
    skipped: tuple[SkippedNode, ...]
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)
    quantized_nodes: int = 0  # quantization nodes in the model as read (QDQ or QOperator)
    activation_qdq_pairs: int = 0  # QuantizeLinear -> DequantizeLinear pairs removed (identity)
    fixed_batch: int | None = None
    input_dtype: np.dtype = field(default=np.dtype(np.float32), compare=False)
    outputs: tuple[str, ...] = ()
    opset: int | None = None
    source_opset: int | None = None
    changed_by: tuple[str, ...] = ()
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def quantized(self) -> bool:
        """True when the model as read was already quantized."""
        return self.quantized_nodes > 0

    def initializer(self, name: str) -> np.ndarray:
        """The constant ``name`` (an initializer or a Constant node's value) as a numpy array."""
        if name not in self._arrays:
            for init in self.model.graph.initializer:
                if init.name == name:
                    self._arrays[name] = numpy_helper.to_array(init)
                    break
            else:
                value = constant_values(self.model).get(name)
                if value is None:
                    raise KeyError(f"no initializer named {name!r}")
                self._arrays[name] = value
        return self._arrays[name]

    def weight(self, layer: Layer | str) -> np.ndarray:
        """The weight array of ``layer`` (a :class:`Layer` or a layer name)."""
        if isinstance(layer, str):
            layer = self.layer(layer)
        return self.initializer(layer.weight)

    def layer(self, name: str) -> Layer:
        """The weighted layer named ``name`` (KeyError if there is none)."""
        for x in self.layers:
            if x.name == name:
                return x
        raise KeyError(f"no weighted layer named {name!r}")
