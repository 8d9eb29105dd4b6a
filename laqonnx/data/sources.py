"""Data sources: a sized, indexable collection of examples iterated in batches in the model's own
units (:class:`DataSource`), in-memory arrays (:class:`ArraySource`, validated against the model's
input range and dtype), a subset, a resizing view (:class:`Resized`, :func:`resize_images`) and a
channels-last view (:class:`ChannelsLast`) for NHWC models."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import numpy as np

from ..errors import DataError

__all__ = ["DataSource", "ArraySource", "Subset", "Resized", "ChannelsLast", "Rescaled", "channels_last", "resize_images", "RANGE_TOLERANCE", "UNIT_RANGE"]

RANGE_TOLERANCE = 1e-3  # relative to the width of the input range
UNIT_RANGE = (0.0, 1.0)


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
        """Examples at ``index`` (int array): ``(n, *sample_shape)`` in the model's units (float32, or int64
        for a model with an integer input), and int64 labels or None."""

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
    """In-memory arrays in the model's own units.

    ``input_range`` (default ``[0, 1]``) is the valid range of the model's input: float data outside
    it (beyond a tolerance of 1e-3 of its width) are refused, and batches are clipped to it; ``None``
    accepts any finite values as they are. uint8 data are images: scaled by 1/255 unless the range's
    upper bound is above 1 (a model that takes 0-255 pixels), in which case they are used as they are.
    ``integer_input``: the model takes integers (token ids, indices): ``x`` must hold integers and is
    yielded as int64, never scaled or clipped.
    """

    def __init__(
        self, x: np.ndarray, y: np.ndarray | None = None, *, name: str = "arrays", num_classes: int | None = None,
        input_range: tuple[float, float] | None = UNIT_RANGE, integer_input: bool = False,
    ):
        self.input_range = None if input_range is None else (float(input_range[0]), float(input_range[1]))
        self.integer_input = bool(integer_input)
        self.x, self.y = _validate_arrays(x, y, name, self.input_range, self.integer_input)
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
        labels = None if self.y is None else self.y[index]
        if self.integer_input:
            return np.ascontiguousarray(x, dtype=np.int64), labels
        if x.dtype == np.uint8 and (self.input_range is None or self.input_range[1] <= 1.0):
            x = x.astype(np.float32) / np.float32(255.0)
        else:
            x = x.astype(np.float32)
        if self.input_range is not None:
            x = np.clip(x, np.float32(self.input_range[0]), np.float32(self.input_range[1]))
        return np.ascontiguousarray(x), labels


def _range_text(lo: float, hi: float) -> str:
    return f"[{lo:g}, {hi:g}]"


def _validate_arrays(
    x: np.ndarray, y: np.ndarray | None, name: str, input_range: tuple[float, float] | None = UNIT_RANGE,
    integer_input: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    x = np.asarray(x)
    if integer_input:
        if not np.issubdtype(x.dtype, np.integer):
            raise DataError(f"{name}: array 'x' has dtype {x.dtype}, but the model takes integers (e.g. token ids)")
    elif x.dtype == np.uint8:
        pass
    elif np.issubdtype(x.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise DataError(f"{name}: array 'x' has {bad} NaN or infinite values")
        if input_range is not None and x.size:
            lo, hi = input_range
            tol = RANGE_TOLERANCE * max(hi - lo, 1e-12)
            if x.min() < lo - tol or x.max() > hi + tol:
                hint = "scale images to [0, 1] (uint8 0-255 is also accepted), " if input_range == UNIT_RANGE else ""
                raise DataError(
                    f"{name}: array 'x' has values in [{x.min():.4g}, {x.max():.4g}], expected {_range_text(lo, hi)} "
                    f"({hint}or give the model's input range with --input-range LO,HI)"
                )
    else:
        raise DataError(f"{name}: array 'x' has dtype {x.dtype}, expected float (in the model's units) or uint8 0-255")
    if x.ndim < 2:
        raise DataError(f"{name}: array 'x' has shape {x.shape}, expected (N, C, H, W), (N, H, W, C) or (N, D)")
    if not integer_input and x.ndim not in (2, 4):
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


class ChannelsLast(DataSource):
    """``source`` (``(C, H, W)`` examples) seen as ``(H, W, C)``, for models with an NHWC input."""

    def __init__(self, source: DataSource):
        if len(source.sample_shape) != 3:
            raise DataError(f"cannot make {source.name} channels-last: its examples are {source.sample_shape}, not images")
        self.source = source
        self.name = source.name

    def __len__(self) -> int:
        return len(self.source)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        c, h, w = self.source.sample_shape
        return (h, w, c)

    @property
    def num_classes(self) -> int | None:
        return self.source.num_classes

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x, y = self.source.take(index)
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y


def channels_last(shape: Sequence[int]) -> bool:
    """True when a per-example model input shape ``(A, B, C)`` reads as ``(H, W, C)``: its last size is
    1 or 3 and its first is not (an NHWC image)."""
    return len(shape) == 3 and int(shape[-1]) in (1, 3) and int(shape[0]) not in (1, 3)


class Rescaled(DataSource):
    """Pixels in [0, 1] from ``source`` mapped linearly onto the model's input range ``[lo, hi]``
    (``lo + x * (hi - lo)``: right for models trained on [-1, 1] (Normalize(0.5, 0.5)) or on 0-255)."""

    def __init__(self, source: DataSource, input_range: tuple[float, float]):
        self.source, self.input_range = source, (float(input_range[0]), float(input_range[1]))
        self.name = f"{source.name} mapped to {_range_text(*self.input_range)}"

    def __len__(self) -> int:
        return len(self.source)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.source.sample_shape

    @property
    def num_classes(self) -> int | None:
        return self.source.num_classes

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x, y = self.source.take(index)
        lo, hi = self.input_range
        return (np.float32(lo) + x * np.float32(hi - lo)).astype(np.float32), y
