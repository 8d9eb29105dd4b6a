"""onnxruntime sessions as classifiers: raw logits in numpy, and an ART black-box estimator.

:class:`OrtModel` runs a model (path or proto) in onnxruntime, batched, float32, and returns
logits. A final Softmax/LogSoftmax is stripped in memory (never in the file) so attacks see
logits, as ART's black-box attacks and DLR losses need. :func:`ort_classifier` wraps it in ART's
``BlackBoxClassifierNeuralNetwork`` (the plain ``BlackBoxClassifier`` lacks ``channels_first``,
which SquareAttack needs) with ``clip_values`` set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..errors import DataError, ModelError

__all__ = ["OrtModel", "load_model", "logits_model", "ort_classifier"]


def load_model(model: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    """Load an ONNX model from a path (or pass a proto through); :class:`ModelError` if unreadable."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise ModelError(f"model file not found: {path}")
    try:
        return onnx.load(path)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types
        raise ModelError(f"cannot read ONNX model {path}: {exc}") from exc


def logits_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Return ``(model', stripped)``: ``model'`` outputs the input of a final (Log)Softmax, if any."""
    out = model.graph.output[0].name
    producer = next((n for n in model.graph.node if out in n.output), None)
    if producer is None or producer.op_type not in ("Softmax", "LogSoftmax"):
        return model, False
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    graph = stripped.graph
    node = next(n for n in graph.node if out in n.output)
    new_out = onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None)
    graph.node.remove(node)
    graph.output.remove(graph.output[0])
    graph.output.insert(0, new_out)
    return stripped, True


@dataclass
class OrtModel:
    """An onnxruntime session that returns float32 logits for inputs in [0, 1]."""

    model: onnx.ModelProto
    threads: int | None = None
    optimized: bool = True
    softmax_stripped: bool = field(init=False, default=False)
    queries: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        self.model, self.softmax_stripped = logits_model(self.model)
        opts = ort.SessionOptions()
        if self.threads is not None:
            if self.threads < 1:
                raise ValueError(f"threads must be >= 1, not {self.threads}")
            opts.intra_op_num_threads = self.threads
        if not self.optimized:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                self.model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime cannot load the model: {exc}") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"expected a model with one input, found {len(inputs)}")
        self.input_name = inputs[0].name
        self.output_name = self._session.get_outputs()[0].name
        dims = inputs[0].shape[1:]
        self.declared_shape: tuple[int | None, ...] = tuple(d if isinstance(d, int) else None for d in dims)
        batch = inputs[0].shape[0] if inputs[0].shape else None
        self.fixed_batch: int | None = batch if isinstance(batch, int) and batch > 0 else None

    def sample_shape(self, data_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """The per-example input shape, dynamic dims filled from ``data_shape``."""
        if data_shape is None:
            if any(d is None for d in self.declared_shape):
                raise ModelError(f"the model's input shape {self.declared_shape} has dynamic dimensions")
            return tuple(int(d) for d in self.declared_shape)  # type: ignore[arg-type]
        if len(data_shape) != len(self.declared_shape) or any(
            d is not None and d != s for d, s in zip(self.declared_shape, data_shape)
        ):
            raise DataError(f"data examples of shape {tuple(data_shape)} do not fit the model input {self.declared_shape}")
        return tuple(data_shape)

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits for ``x`` (float32), in batches of ``batch_size``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        outs = []
        step = self.fixed_batch or batch_size
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            if self.fixed_batch and len(chunk) < step:  # a fixed batch axis: pad with copies, cut after
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), axis=0)])
            out = self._session.run([self.output_name], {self.input_name: chunk})[0]
            outs.append(out[: min(step, len(x) - i)])
        self.queries += len(x)
        if not outs:
            return np.zeros((0, 0), dtype=np.float32)
        out = np.concatenate(outs).astype(np.float32, copy=False)
        return out.reshape(len(x), -1)

    def labels(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return self.predict(x, batch_size).argmax(axis=1)


def ort_classifier(ort_model: OrtModel, input_shape: tuple[int, ...], nb_classes: int,
                   clip_values: tuple[float, float] = (0.0, 1.0)) -> Any:
    """ART ``BlackBoxClassifierNeuralNetwork`` over ``ort_model``: logits, channels first, clipped."""
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    return BlackBoxClassifierNeuralNetwork(
        predict_fn=ort_model.predict,
        input_shape=tuple(input_shape),
        nb_classes=int(nb_classes),
        channels_first=True,
        clip_values=clip_values,
    )
