"""Data stage: calibration and evaluation images as float32 batches in [0, 1].

:func:`open_data` accepts

* ``"digits"``, ``"digits:train"``, ``"digits:test"``: scikit-learn's bundled digits (no download),
  resized and given 1 or 3 channels to fit the model's input (or flattened for an ``(64,)`` input);
* a ``.npz`` file with ``x`` float ``(N, C, H, W)`` or ``(N, D)`` in [0, 1] (uint8 0-255 is also
  accepted and scaled by 1/255) and optionally ``y`` integer labels ``(N,)``; read with
  ``allow_pickle=False``;
* a folder with one sub-folder of images per class (class names sorted, images read lazily with
  Pillow one batch at a time, converted to RGB or L and resized to the model's H, W);
* CIFAR-10/100 python batches: a folder with ``data_batch_1..5`` / ``test_batch``, or one batch
  file, read through a restricted unpickler that refuses every global except the three numpy
  array constructors such files need.

Every source yields ``(x, y)`` batches, ``x`` float32 and ``y`` int64 (or ``None`` without labels).

- :mod:`.sources`: :class:`DataSource`, in-memory arrays, subsets, resizing;
- :mod:`.formats`: the ``.npz``, image-folder, CIFAR and digits readers;
- this module: :func:`open_data` (a spec to a source) and :func:`check_against_model`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from .formats import IMAGE_EXTENSIONS, ImageFolderSource, _open_cifar, _open_digits, _open_npz, _starts_like_pickle, load_cifar_batch
from .sources import ArraySource, DataSource, Resized, Subset, _model_shape, resize_images

__all__ = [
    "DataSource",
    "ArraySource",
    "ImageFolderSource",
    "Subset",
    "Resized",
    "open_data",
    "check_against_model",
    "load_cifar_batch",
    "resize_images",
    "IMAGE_EXTENSIONS",
]


def check_against_model(source: DataSource, input_shape: Sequence[int]) -> None:
    """Raise DataError unless one example of ``source`` fits the model input (batch axis optional)."""
    got = tuple(source.sample_shape)
    want = _model_shape(input_shape)
    if len(want) == len(got) and all(w < 0 or w == g for w, g in zip(want, got)):
        return
    shown = tuple("?" if w < 0 else w for w in want)
    hint = ""
    if len(got) == 3 and got[-1] in (1, 3) and got[0] not in (1, 3):
        hint = " (the data looks channels-last: store it as (N, C, H, W))"
    raise DataError(f"data {source.name} has examples of shape {got} but the model expects {shown}{hint}")


def open_data(
    spec: str | os.PathLike | DataSource | np.ndarray | tuple,
    *,
    input_shape: Sequence[int] | None = None,
    split: str = "test",
    limit: int | None = None,
) -> DataSource:
    """Open a data source from a spec (see the module doc); check it fits ``input_shape`` if given.

    ``spec`` may also be in memory: a :class:`DataSource`, an array ``x`` or a tuple ``(x, y)``
    (validated like an ``.npz``). ``split`` selects the digits split and the CIFAR batches of a
    folder; ``limit`` keeps the first ``limit`` examples.
    """
    if isinstance(spec, DataSource):
        source: DataSource = spec
    elif isinstance(spec, np.ndarray):
        source = ArraySource(spec)
    elif isinstance(spec, tuple):
        if len(spec) != 2:
            raise DataError(f"in-memory data must be a tuple (x, y), got a tuple of {len(spec)} items")
        source = ArraySource(spec[0], None if spec[1] is None else np.asarray(spec[1]))
    elif isinstance(spec, (str, os.PathLike)):
        source = _open_spec(os.fspath(spec), input_shape, split)
    else:
        raise DataError(f"unsupported data {type(spec).__name__}: give a path, 'digits', an array or (x, y)")
    if input_shape is not None:
        check_against_model(source, input_shape)
    if limit is not None:
        if int(limit) < 1:
            raise DataError(f"limit must be positive, got {limit!r}")
        source = Subset(source, np.arange(min(int(limit), len(source))))
    return source


def _open_spec(text: str, input_shape: Sequence[int] | None, split: str) -> DataSource:
    if text in ("digits", "digits:train", "digits:test", "digits:all"):
        source = _open_digits(text.split(":", 1)[1] if ":" in text else split, input_shape)
    else:
        path = Path(text)
        if not path.exists():
            raise DataError(
                f"data {text!r} not found (expected digits[:train|:test], a .npz, an image folder or CIFAR batches)"
            )
        if path.is_dir():
            is_cifar = any((path / n).is_file() for n in ("test_batch", "data_batch_1"))
            source = _open_cifar(path, split) if is_cifar else ImageFolderSource(path, _image_shape(input_shape))
        elif path.suffix.lower() == ".npz":
            source = _open_npz(path)
        elif _starts_like_pickle(path):
            source = _open_cifar(path, split)
        else:
            raise DataError(f"{path}: unrecognised data file (expected .npz or a CIFAR python batch)")
    return source


def _image_shape(input_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    if input_shape is None:
        return None
    shape = _model_shape(input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"an image folder needs a static (C, H, W) model input, got {tuple(input_shape)}")
    return shape
