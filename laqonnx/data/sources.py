"""Data sources: a sized, indexable collection of examples iterated as float32 batches in [0, 1]
(:class:`DataSource`), in-memory arrays (:class:`ArraySource`, validated), a subset, and a
resizing view (:class:`Resized`, :func:`resize_images`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import numpy as np

from ..errors import DataError

__all__ = ["DataSource", "ArraySource", "Subset", "Resized", "resize_images", "RANGE_TOLERANCE"]

RANGE_TOLERANCE = 1e-3


class DataSource(ABC):
    """A sized, indexable collection of examples, iterated in batches."""

    name: str

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one example: ``(C, H, W)`` or ``(D,)``."""

    @property
    def num_classes(self) -> int | None:
        return None

    @abstractmethod
    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Examples at ``index`` (int array): float32 ``(n, *sample_shape)`` in [0, 1], int64 labels or None."""

    def batches(self, batch_size: int, *, limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Consecutive batches of at most ``batch_size`` examples, the first ``limit`` examples only if given."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DataError(f"batch size must be a positive integer, got {batch_size!r}")
        n = len(self) if limit is None else min(len(self), max(int(limit), 0))
        for start in range(0, n, int(batch_size)):
            yield self.take(np.arange(start, min(start + int(batch_size), n)))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {len(self)} x {self.sample_shape}>"


class ArraySource(DataSource):
    """In-memory arrays; uint8 images are kept as uint8 and scaled per batch."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray | None = None, *, name: str = "arrays", num_classes: int | None = None
    ):
        self.x, self.y = _validate_arrays(x, y, name)
        self.name = name
        if num_classes is None and self.y is not None and len(self.y):
            num_classes = int(self.y.max()) + 1
        self._num_classes = num_classes

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = self.x[index]
        x = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else np.clip(x.astype(np.float32), 0.0, 1.0)
        return np.ascontiguousarray(x), (None if self.y is None else self.y[index])


def _validate_arrays(x: np.ndarray, y: np.ndarray | None, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    x = np.asarray(x)
    if x.dtype == np.uint8:
        pass
    elif np.issubdtype(x.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise DataError(f"{name}: array 'x' has {bad} NaN or infinite values")
        if x.size and (x.min() < -RANGE_TOLERANCE or x.max() > 1 + RANGE_TOLERANCE):
            raise DataError(
                f"{name}: array 'x' has values in [{x.min():.4g}, {x.max():.4g}], expected [0, 1] "
                "(scale images to [0, 1]; uint8 0-255 is also accepted)"
            )
    else:
        raise DataError(f"{name}: array 'x' has dtype {x.dtype}, expected float in [0, 1] or uint8 0-255")
    if x.ndim not in (2, 4):
        raise DataError(f"{name}: array 'x' has shape {x.shape}, expected (N, C, H, W) or (N, D)")
    if y is None:
        return x, None
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)):
            raise DataError(f"{name}: array 'y' has {int(np.count_nonzero(~np.isfinite(y)))} NaN or infinite values")
        if not np.all(y == np.round(y)):
            raise DataError(f"{name}: array 'y' holds non-integer labels")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: array 'y' has dtype {y.dtype}, expected integer class labels")
    if y.ndim != 1:
        raise DataError(f"{name}: array 'y' has shape {y.shape}, expected (N,) class indices")
    if len(y) != len(x):
        raise DataError(f"{name}: 'x' has {len(x)} examples but 'y' has {len(y)} labels")
    if len(y) and y.min() < 0:
        raise DataError(f"{name}: array 'y' has negative labels")
    return x, y.astype(np.int64)


class Subset(DataSource):
    """The examples of ``source`` at ``indices``, in that order."""

    def __init__(self, source: DataSource, indices: Sequence[int] | np.ndarray):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(source)):
            raise DataError(f"subset indices out of range for {source.name} ({len(source)} examples)")
        self.name = f"{source.name}[{len(self.indices)}]"

    def __len__(self) -> int:
        return int(len(self.indices))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.source.sample_shape

    @property
    def num_classes(self) -> int | None:
        return self.source.num_classes

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.source.take(self.indices[np.asarray(index, dtype=np.int64)])


def resize_images(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize float ``(N, C, H, W)`` images in [0, 1] to ``shape = (C', H', W')``.

    Channels: 1 -> 3 repeats the gray channel, 3 -> 1 uses Pillow's luminance (ITU-R 601-2:
    0.299 R + 0.587 G + 0.114 B); spatial size: Pillow bilinear on float images.
    """
    from PIL import Image

    c, h, w = (int(d) for d in shape)
    if x.ndim != 4 or c not in (1, 3) or x.shape[1] not in (1, 3):
        raise DataError(f"cannot convert images of shape {x.shape[1:]} to {tuple(shape)}: only 1 or 3 channels")
    if x.shape[1] != c:
        luma = np.float32([0.299, 0.587, 0.114])
        x = np.repeat(x, 3, axis=1) if c == 3 else np.tensordot(luma, x, axes=([0], [1]))[:, None]
    if x.shape[2:] != (h, w):
        out = np.empty((x.shape[0], c, h, w), dtype=np.float32)
        for i in range(x.shape[0]):
            for ch in range(c):
                img = Image.fromarray(np.ascontiguousarray(x[i, ch], dtype=np.float32), mode="F")
                out[i, ch] = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR))
        x = out
    return np.clip(x, 0.0, 1.0).astype(np.float32)


class Resized(DataSource):
    """``source`` with every batch converted to ``shape`` by :func:`resize_images`."""

    def __init__(self, source: DataSource, shape: Sequence[int]):
        if len(source.sample_shape) != 3 or len(shape) != 3:
            raise DataError(f"cannot resize {source.name} from {source.sample_shape} to {tuple(shape)}: images only")
        self.source, self._shape = source, tuple(int(d) for d in shape)
        self.name = source.name

    def __len__(self) -> int:
        return len(self.source)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def num_classes(self) -> int | None:
        return self.source.num_classes

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x, y = self.source.take(index)
        return resize_images(x, self._shape), y


def _model_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Model input shape without the batch axis; dynamic dims (None, names, <= 0) become -1.

    Examples are (C, H, W) or (D,), so a 4-d or 2-d shape carries a batch axis, which is dropped.
    """
    dims = [int(d) if isinstance(d, (int, np.integer)) and d > 0 else -1 for d in input_shape]
    return tuple(dims[1:] if len(dims) in (2, 4) else dims)
