"""What one evaluation reads: its options, each model's data in the model's own units and layout,
the model's size, and the check of eps against the input range.

Data come from :func:`laqonnx.data.open_data` (the test split), asked for in the model's layout
(an ``(H, W, C)`` input gets channels-last images), dtype (an integer input gets integer arrays)
and input range (arrays are checked against it, pixel sources are mapped onto it).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import DataError, LaqonnxWarning
from .attacks import Threat
from .ort_estimator import OrtModel

__all__ = ["RunOptions", "load_eval_data", "model_size", "warn_large_eps", "channels_first"]


@dataclass(frozen=True)
class RunOptions:
    """How each model is evaluated (see :func:`laqonnx.evaluate`)."""

    threads: int | None
    batch_size: int
    seed: int
    progress: bool
    latency: bool
    sweep: bool


def channels_first(sample_shape: tuple[int, ...]) -> bool:
    """False for an ``(H, W, C)`` image input (as :mod:`laqonnx.data` reads one), else True."""
    from ..data.sources import channels_last

    return not channels_last(sample_shape)


def load_eval_data(data: Any, ort: OrtModel, *, limit: int | None,
                   input_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Labelled examples ``(x, y)`` for ``ort``'s model: a data spec (test split), a
    :class:`~laqonnx.data.DataSource` or an ``(x, y)`` tuple in the model's units (within
    ``input_range``; integers for an integer-input model)."""
    from ..data import DataSource, open_data

    if isinstance(data, tuple) and len(data) == 2 and data[1] is not None:
        labels = np.asarray(data[1])
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels must be integers, not {labels.dtype}")
        data = (np.asarray(data[0]), labels)
    elif not isinstance(data, (str, os.PathLike, DataSource, tuple)):
        raise DataError("data must be a data spec string, a DataSource or an (x, y) tuple of arrays")
    full = (ort.fixed_batch or -1, *(-1 if d is None else d for d in ort.declared_shape))
    source = open_data(data if not isinstance(data, os.PathLike) else os.fspath(data),
                       input_shape=full if len(full) in (2, 4) else None,  # open_data's examples: (C, H, W) or (D,)
                       split="test", limit=limit, input_range=input_range, integer_input=ort.integer_input)
    pairs = list(source.batches(256))
    if not pairs:
        raise DataError(f"data {source.name} has no examples")
    if any(p[1] is None for p in pairs):
        raise DataError(f"data {source.name} has no labels: robust accuracy needs labelled data")
    x, y = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    if x.ndim < 2 or len(x) != len(y) or y.ndim != 1 or len(x) == 0:
        raise DataError(f"data must be x (N, ...) and y (N,) with N > 0; got {x.shape} and {y.shape}")
    return x, y.astype(np.int64)


def model_size(model: Any, proto: onnx.ModelProto) -> int:
    """Bytes of the model: its file plus the external-data files beside it, or the proto's size."""
    if isinstance(model, onnx.ModelProto):
        return int(proto.ByteSize())
    from ..graph.io import external_locations

    path = Path(model)
    size = path.stat().st_size
    try:
        locations = external_locations(onnx.load(str(path), load_external_data=False))
    except Exception:  # noqa: BLE001 - it was read once already; count the file alone
        locations = []
    return int(size + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file()))


def warn_large_eps(threat: Threat) -> None:
    """A :class:`LaqonnxWarning` when an L-inf ``eps`` is at least half the width of the input range
    (see :func:`laqonnx._util.eps.large_eps_note`, which ``quantize`` shares)."""
    from .._util.eps import large_eps_note

    note = large_eps_note(threat.eps, threat.norm, threat.input_range)
    if note is not None:
        warnings.warn(note, LaqonnxWarning, stacklevel=3)
