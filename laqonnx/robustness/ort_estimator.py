"""onnxruntime sessions as classifiers: raw logits in numpy, and an ART black-box estimator.

:class:`OrtModel` runs a model (path or proto) in onnxruntime through :func:`laqonnx.graph.open_session`
and :func:`laqonnx.graph.run_batched` (chunk by chunk at a fixed batch size the model declares) and
returns the logits of one output (the first, or ``output=``). A final Softmax/LogSoftmax is stripped
in memory (never in the file) so attacks see logits, as ART's black-box attacks and DLR losses need.
:func:`ort_classifier` wraps it in ART's ``BlackBoxClassifierNeuralNetwork`` (the plain
``BlackBoxClassifier`` lacks ``channels_first``, which SquareAttack needs) with ``clip_values`` set
to the model's input range.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..errors import DataError, LaqonnxError, ModelError
from ..graph import declared_batch, input_dtype, open_session, read_model, run_batched
from ..graph.intake import _chosen_output, _single_input
from ..graph.passes import one_line

__all__ = ["OrtModel", "load_model", "logits_model", "ort_classifier"]


def load_model(model: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    """Read an ONNX model (with its external data) or pass a proto through; :class:`ModelError` if unreadable."""
    if isinstance(model, onnx.ModelProto):
        return model
    return read_model(model).model


def logits_model(model: onnx.ModelProto, output: str | None = None) -> tuple[onnx.ModelProto, bool]:
    """Return ``(model', stripped)``: ``model'`` has one output, ``output`` (default: the first), or the
    input of the final (Log)Softmax producing it, also behind Identity nodes as keras2onnx writes them
    (``stripped`` then True). ``model`` is not modified."""
    from ..quant.guard import logits_view

    name = _chosen_output(tuple(o.name for o in model.graph.output), output, "the model")
    producer = {o: n for n in model.graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    chain, target = [], name
    while target in producer and producer[target].op_type == "Identity" and producer[target].domain in ("", "ai.onnx"):
        chain.append(producer[target])
        target = producer[target].input[0]
        if uses.get(target, 0) != 1:  # an intermediate used elsewhere: keep the graph as it is
            return logits_view(model, name), False
    node = producer.get(target)
    if node is None or node.op_type not in ("Softmax", "LogSoftmax") or node.domain not in ("", "ai.onnx"):
        return logits_view(model, name), False
    view = logits_view(model, target)
    dead = {o for n in chain for o in n.output}
    kept = [n for n in view.graph.node if not dead.intersection(n.output)]
    del view.graph.node[:]
    view.graph.node.extend(kept)
    return view, True


@dataclass
class OrtModel:
    """An onnxruntime session that returns float32 logits of one output (``output``, default the first).

    ``input_dtype`` is the model's input type (float32, or int64 for token ids, ...), ``declared_shape``
    its per-example shape (None where dynamic) and ``fixed_batch`` the batch size it declares, if any.
    """

    model: onnx.ModelProto
    threads: int | None = None
    optimized: bool = True
    output: str | None = None
    softmax_stripped: bool = field(init=False, default=False)
    queries: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, not {self.threads}")
        inp = _single_input(self.model, "the model")
        self.input_name = inp.name
        self.input_dtype: np.dtype = input_dtype(inp)
        self.fixed_batch: int | None = declared_batch(inp)
        self.output_name = _chosen_output(tuple(o.name for o in self.model.graph.output), self.output, "the model")
        self.model, self.softmax_stripped = logits_model(self.model, self.output_name)
        self._logits = self.model.graph.output[0].name
        self._session = open_session(self.model, threads=self.threads, optimized=self.optimized)
        dims = self._session.get_inputs()[0].shape[1:]
        self.declared_shape: tuple[int | None, ...] = tuple(d if isinstance(d, int) and d > 0 else None for d in dims)

    @property
    def integer_input(self) -> bool:
        """True when the model takes integers (token ids, indices), not a continuous input."""
        return bool(np.issubdtype(self.input_dtype, np.integer))

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
        """Logits for ``x`` (float32, ``(N, classes)``), in batches of ``batch_size`` (or the fixed batch)."""
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if len(x) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        try:
            out = run_batched(self._session, self.input_name, x, [self._logits], self.fixed_batch,
                              batch_size=batch_size)[0]
        except LaqonnxError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime failed to run the model: {one_line(exc)}") from exc
        self.queries += len(x)
        return out.astype(np.float32, copy=False).reshape(len(x), -1)

    def labels(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return self.predict(x, batch_size).argmax(axis=1)


def ort_classifier(ort_model: OrtModel, input_shape: tuple[int, ...], nb_classes: int,
                   clip_values: tuple[float, float] = (0.0, 1.0), channels_first: bool = True) -> Any:
    """ART ``BlackBoxClassifierNeuralNetwork`` over ``ort_model``: logits, clipped to ``clip_values``
    (the model's input range); ``channels_first=False`` for an (H, W, C) input."""
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    return BlackBoxClassifierNeuralNetwork(
        predict_fn=ort_model.predict,
        input_shape=tuple(input_shape),
        nb_classes=int(nb_classes),
        channels_first=bool(channels_first),
        clip_values=tuple(float(v) for v in clip_values),
    )
