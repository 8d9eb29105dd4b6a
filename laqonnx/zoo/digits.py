"""The built-in image data: scikit-learn's bundled 8x8 handwritten digits (no download).

:func:`load_digits` returns images as float32 ``(N, C, S, S)`` in [0, 1] (pixel / 16) and int64
labels, optionally upsampled bilinearly (numpy only, so it works without torch) and repeated to
three channels. The train/test split is a fixed, stratified 80/20 split that depends only on the
seed: the order inside each class is given by a cryptographic hash of ``(seed, index)``, so the
same seed gives the same split on every machine and every numpy/scikit-learn version.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from ..errors import DataError

__all__ = ["load_digits", "split_indices", "bilinear_resize", "NUM_CLASSES", "NATIVE_SIZE", "TEST_FRACTION"]

NUM_CLASSES = 10
NATIVE_SIZE = 8
TEST_FRACTION = 0.2
_SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as (N, 8, 8) float32 in [0, 1] and (N,) int64, read once."""
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0)
    y = np.asarray(bunch.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _hash_key(seed: int, index: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()


@functools.lru_cache(maxsize=8)
def split_indices(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) index arrays of the stratified 80/20 split for ``seed``.

    Each class contributes ``round(0.2 * n_class)`` examples to the test set, chosen by the
    hash order of ``(seed, index)``; the two sets are disjoint and cover every example.
    """
    _, y = _raw()
    test: list[int] = []
    for cls in range(NUM_CLASSES):
        members = np.flatnonzero(y == cls).tolist()
        members.sort(key=lambda i: _hash_key(seed, i))
        test.extend(members[: int(round(TEST_FRACTION * len(members)))])
    test_idx = np.array(sorted(test), dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[test_idx] = False
    train_idx = np.flatnonzero(mask).astype(np.int64)
    train_idx.setflags(write=False)
    test_idx.setflags(write=False)
    return train_idx, test_idx


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights with half-pixel centres (torch ``align_corners=False``)."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - w1)
    np.add.at(m, (rows, i1), w1)
    return m


def bilinear_resize(x: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(..., H, W)`` images to ``(..., size, size)`` bilinearly (no antialiasing).

    Matches ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``; every
    output pixel is a convex combination of input pixels, so [0, 1] stays [0, 1].
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return np.array(x, dtype=np.float32, copy=True)
    rows = _interp_matrix(h, size)
    cols = _interp_matrix(w, size)
    out = np.einsum("ih,...hw,jw->...ij", rows, x.astype(np.float64), cols, optimize=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def load_digits(size: int = 8, split: str = "all", channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Load the bundled digits as ``(x, y)``.

    Args:
        size: image side; 8 is native, larger sizes are bilinearly upsampled (e.g. 16, 32).
        split: ``"train"`` (80 %), ``"test"`` (20 %) or ``"all"`` (1797 images, original order).
        channels: 1 (gray) or 3 (the gray channel repeated, for RGB architectures).
        seed: selects the stratified split; the same seed always gives the same split.

    Returns:
        ``x`` float32 ``(N, channels, size, size)`` in [0, 1] and ``y`` int64 ``(N,)`` in 0..9.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < NATIVE_SIZE:
        raise DataError(f"digits image size must be an integer >= {NATIVE_SIZE}, got {size!r}")
    if split not in _SPLITS:
        raise DataError(f"digits split must be one of {', '.join(_SPLITS)}, got {split!r}")
    if channels not in (1, 3):
        raise DataError(f"digits channels must be 1 or 3, got {channels!r}")
    x, y = _raw()
    if split != "all":
        train_idx, test_idx = split_indices(int(seed))
        idx = train_idx if split == "train" else test_idx
        x, y = x[idx], y[idx]
    x = bilinear_resize(x, int(size))[:, None]
    if channels == 3:
        x = np.repeat(x, 3, axis=1)
    return np.ascontiguousarray(x, dtype=np.float32), np.array(y, dtype=np.int64, copy=True)
