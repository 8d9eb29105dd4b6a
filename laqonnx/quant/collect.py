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
    only be "minmax", and skipping the histogram roughly halves their cost.
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
    collector = StatsCollector(bins)
    cheap = set(minmax_only)
    bar = tqdm(total=total, desc="calibrating", unit="ex", disable=not progress, file=sys.stderr, leave=False)
    try:
        for batch in batches:
            x = np.ascontiguousarray(batch[0] if isinstance(batch, tuple) else batch, dtype=np.float32)
            if feeds[0] in tensors:
                collector.update(feeds[0], x, feeds[0] not in cheap)
            if wanted:
                for name, value in zip(wanted, session.run(wanted, {feeds[0]: x})):
                    collector.update(name, value, name not in cheap)
            bar.update(len(x))
    finally:
        bar.close()
    result = collector.result()
    if not result and tensors:
        raise DataError("no calibration batches: the data source is empty")
    return {t: result[t] for t in dict.fromkeys(tensors)}
