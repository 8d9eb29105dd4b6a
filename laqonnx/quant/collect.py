"""Calibration runs: :func:`collect` runs the model in onnxruntime batch by batch and summarises
the requested tensors as streaming :class:`~laqonnx.quant.stats.TensorStats`."""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Sequence

import numpy as np
import onnx

from ..errors import DataError, ModelError
from .stats import DEFAULT_BINS, StatsCollector, TensorStats

__all__ = ["collect"]


def collect(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    batches: Iterable[np.ndarray],
    *,
    bins: int = DEFAULT_BINS,
    progress: bool = True,
    total: int | None = None,
    minmax_only: Collection[str] = (),
) -> dict[str, TensorStats]:
    """Run ``model`` in onnxruntime on each batch and summarise the requested tensors.

    The tensors are added as graph outputs on a copy of the model; ``batches`` yields input arrays
    (or ``(x, y)`` tuples, as :meth:`laqonnx.data.DataSource.batches` does); ``total`` is the
    number of examples, for the progress bar. Only one batch of activations is alive at a time.
    Tensors in ``minmax_only`` get no histogram (``TensorStats.histogram`` False): their range can
    only be "minmax", and skipping the histogram roughly halves their cost. A model whose input
    declares a fixed batch size (often 1) runs each batch in chunks of that size; an integer input
    is fed as the model's integer type.
    """
    import onnxruntime as ort
    from tqdm import tqdm

    graph = model.graph
    inits = {t.name for t in graph.initializer}
    feeds = [i.name for i in graph.input if i.name not in inits]
    if len(feeds) != 1:
        raise ModelError(f"calibration needs a model with one input, found {feeds}")
    produced = {o for n in graph.node for o in n.output} | set(feeds)
    unknown = [t for t in tensors if t not in produced]
    if unknown:
        raise ModelError(f"tensors not produced by the model: {', '.join(map(str, unknown))}")
    wanted = list(dict.fromkeys(t for t in tensors if t != feeds[0]))
    from ..graph import with_outputs

    copy = with_outputs(model, wanted)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # onnxruntime's memory-pattern planner re-plans on the second run and page-faults every exposed
    # activation again: on ResNet-18 (49 outputs, batches of 32) the second batch took 1.4 s
    # instead of 0.4 s. Calibration runs a handful of batches, so the plan never pays off.
    options.enable_mem_pattern = False
    try:
        session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot load the model for calibration: {exc}") from exc
    del copy
    meta = session.get_inputs()[0]
    fixed = meta.shape[0] if meta.shape and isinstance(meta.shape[0], int) and meta.shape[0] > 0 else None
    dtype = np.float32 if "float" in meta.type else np.int64 if "int64" in meta.type else np.int32

    def run(x: np.ndarray) -> list[np.ndarray]:
        if not fixed or len(x) == fixed:
            return session.run(wanted, {feeds[0]: x})
        parts = []
        for i in range(0, len(x), fixed):
            chunk = x[i:i + fixed]
            n = len(chunk)
            if n < fixed:  # pad with copies of the last example; the copies are cut off again
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
            parts.append([v[:n] for v in session.run(wanted, {feeds[0]: chunk})])
        return [np.concatenate([p[j] for p in parts]) for j in range(len(wanted))]

    collector = StatsCollector(bins)
    cheap = set(minmax_only)
    bar = tqdm(total=total, desc="calibrating", unit="ex", disable=not progress, file=sys.stderr, leave=False)
    try:
        for batch in batches:
            x = np.ascontiguousarray(batch[0] if isinstance(batch, tuple) else batch, dtype=dtype)
            if feeds[0] in tensors:
                collector.update(feeds[0], x, feeds[0] not in cheap)
            if wanted:
                for name, value in zip(wanted, run(x)):
                    collector.update(name, value, name not in cheap)
            bar.update(len(x))
    finally:
        bar.close()
    result = collector.result()
    if not result and tensors:
        raise DataError("no calibration batches: the data source is empty")
    return {t: result[t] for t in dict.fromkeys(tensors)}
