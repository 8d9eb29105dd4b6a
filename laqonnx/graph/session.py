"""The one way to open an onnxruntime session, and batched runs that respect a fixed batch size.

:func:`open_session` opens a CPU ``InferenceSession`` (errors at severity 3 and above only) and
turns onnxruntime's refusal into a one-line :class:`ModelError`. :func:`run_batched` runs an array
of examples through a session in chunks: of the model's fixed batch size when it declares one
(the last chunk padded by repeating its last example, the padding cut off the outputs), else of
``batch_size``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from ..errors import DataError, ModelError
from .passes import one_line

__all__ = ["open_session", "run_batched", "DEFAULT_BATCH"]

DEFAULT_BATCH = 256


def open_session(
    model: onnx.ModelProto | str | os.PathLike[str] | bytes,
    *,
    threads: int | None = None,
    optimized: bool = True,
    mem_pattern: bool = True,
) -> Any:
    """An onnxruntime CPU session for ``model`` (a ModelProto, a path, or serialized bytes).

    ``threads`` sets the intra-op threads (None: onnxruntime's default); ``optimized=False``
    disables graph optimizations (the graph runs as written); ``mem_pattern=False`` disables the
    memory-pattern planner (it re-plans whenever the input shape changes).
    """
    import onnxruntime as ort

    if threads is not None and (int(threads) != threads or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.enable_mem_pattern = bool(mem_pattern)
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    if isinstance(model, onnx.ModelProto):
        where, data = "the model", model.SerializeToString()
    elif isinstance(model, (bytes, bytearray)):
        where, data = "the model", bytes(model)
    elif isinstance(model, (str, os.PathLike)):
        where, data = str(model), os.fspath(model)
    else:
        raise ModelError(f"expected a path, bytes or an onnx.ModelProto, got {type(model).__name__}")
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load {where}: {one_line(exc)}") from exc


def run_batched(
    session: Any,
    feeds_name: str,
    x: np.ndarray,
    output_names: Sequence[str],
    fixed_batch: int | None,
    *,
    batch_size: int = DEFAULT_BATCH,
) -> list[np.ndarray]:
    """Run the examples ``x`` (batch first) through ``session``; one array per output, batch first.

    With ``fixed_batch`` the model is fed exactly that many examples at a time (the last chunk is
    padded by repeating its last example and the padding is cut off); without it, chunks of at most
    ``batch_size``. Every output must have the batch on axis 0.
    """
    x = np.asarray(x)
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"no examples to run (input of shape {x.shape})")
    chunk = fixed_batch if fixed_batch is not None else batch_size
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"batch size must be a positive integer, got {chunk!r}")
    names = list(output_names)
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        n = len(part)
        if fixed_batch is not None and n < chunk:
            part = np.concatenate([part, np.repeat(part[-1:], chunk - n, axis=0)])
        outs = session.run(names, {feeds_name: part})
        for i, (name, out) in enumerate(zip(names, outs)):
            out = np.asarray(out)
            if out.ndim == 0 or len(out) != len(part):
                raise ModelError(f"output {name!r} has shape {out.shape}: no batch axis of size {len(part)} to split")
            parts[i].append(out[:n])
    return [np.concatenate(p, axis=0) for p in parts]
