"""Data sources: calibration and evaluation images as float32 batches in [0, 1].

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
"""

from __future__ import annotations

import io
import os
import pickle
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import DataError

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

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
RANGE_TOLERANCE = 1e-3
_SPLITS = ("train", "test", "all")


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


class ImageFolderSource(DataSource):
    """``root/<class>/<image>``: classes sorted by name, images loaded lazily per batch."""

    def __init__(self, root: str | os.PathLike, shape: Sequence[int] | None = None):
        self.root = Path(root)
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise DataError(f"{self.root}: no class sub-folders (expected {self.root}/<class>/<image>)")
        files: list[tuple[Path, int]] = []
        for label, cls in enumerate(self.classes):
            files += [(p, label) for p in sorted((self.root / cls).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise DataError(f"{self.root}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in its class folders")
        self.files = files
        self.name = f"images:{self.root}"
        if shape is None:
            first = self._open(files[0][0])
            shape = (1 if first.mode in ("1", "L", "I", "I;16", "F") else 3, first.height, first.width)
        if len(shape) != 3 or int(shape[0]) not in (1, 3) or min(int(d) for d in shape) < 1:
            raise DataError(f"an image folder needs a (C, H, W) model input with 1 or 3 channels, got {tuple(shape)}")
        self._shape = tuple(int(d) for d in shape)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def num_classes(self) -> int | None:
        return len(self.classes)

    @staticmethod
    def _open(path: Path):
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(path)
            img.load()
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        return img

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        from PIL import Image

        c, h, w = self._shape
        x = np.empty((len(index), c, h, w), dtype=np.float32)
        y = np.empty(len(index), dtype=np.int64)
        for k, i in enumerate(np.asarray(index, dtype=np.int64)):
            path, y[k] = self.files[i]
            img = self._open(path).convert("L" if c == 1 else "RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
            x[k] = arr[None] if c == 1 else arr.transpose(2, 0, 1)
        return x, y


class _CifarUnpickler(pickle.Unpickler):
    """Allows exactly the globals a CIFAR python batch needs to rebuild its numpy array."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise DataError(f"unsafe pickle: refusing global {module}.{name}")
        if name == "_reconstruct":
            return np.zeros(0).__reduce__()[0]
        return getattr(np, name)

    def persistent_load(self, pid):
        raise DataError("unsafe pickle: refusing a persistent id")


def load_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int]:
    """Read one CIFAR python batch safely: uint8 ``(N, 3, 32, 32)``, int64 labels, number of classes."""
    try:
        with open(path, "rb") as fh:
            obj = _CifarUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable CIFAR python batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict) or b"data" not in obj:
        raise DataError(f"{path}: not a CIFAR python batch (expected a dict with b'data')")
    key, classes = (b"labels", 10) if b"labels" in obj else (b"fine_labels", 100)
    data, labels = obj[b"data"], obj.get(key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: b'data' must be a uint8 (N, 3072) array")
    if labels is None or len(labels) != data.shape[0]:
        raise DataError(f"{path}: {key!r} missing or not one label per image")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64), classes


def _open_cifar(path: Path, split: str) -> DataSource:
    if path.is_dir():
        names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        names["all"] = names["train"] + names["test"]
        if split not in names:
            raise DataError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
        files = [path / n for n in names[split] if (path / n).is_file()]
        if not files:
            raise DataError(f"{path}: no CIFAR {split} batches ({', '.join(names[split])})")
    else:
        files = [path]
    parts = [load_cifar_batch(f) for f in files]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return ArraySource(x, y, name=f"cifar:{path}", num_classes=max(p[2] for p in parts))


def _open_npz(path: Path) -> DataSource:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files:
                raise DataError(f"{path}: no array 'x' (found {', '.join(npz.files) or 'nothing'})")
            x = npz["x"]
            y = npz["y"] if "y" in npz.files else None
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read .npz ({exc})") from exc
    return ArraySource(x, y, name=f"npz:{path}")


def _open_digits(split: str, input_shape: Sequence[int] | None) -> DataSource:
    from .zoo.digits import NUM_CLASSES, load_digits

    if split not in _SPLITS:
        raise DataError(f"digits split must be one of {', '.join(_SPLITS)}, got {split!r}")
    shape = _model_shape(input_shape) if input_shape is not None else (1, 8, 8)
    if len(shape) == 1:
        side = int(round(np.sqrt(shape[0])))
        if side * side != shape[0] or side < 8:
            raise DataError(f"digits are square images: cannot flatten them to a model input of size {shape[0]}")
        x, y = load_digits(size=side, split=split)
        x = x.reshape(len(x), -1)
    else:
        c, h, w = shape
        c = 1 if c < 0 else c
        h, w = (8, 8) if h < 0 and w < 0 else (w if h < 0 else h, h if w < 0 else w)
        if h != w or c not in (1, 3) or h < 8:
            raise DataError(f"digits fit square (1 or 3, S, S) inputs with S >= 8, not a model input of {tuple(shape)}")
        x, y = load_digits(size=h, split=split, channels=c)
    return ArraySource(x, y, name=f"digits:{split}", num_classes=NUM_CLASSES)


def _model_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Model input shape without the batch axis; dynamic dims (None, names, <= 0) become -1.

    Examples are (C, H, W) or (D,), so a 4-d or 2-d shape carries a batch axis, which is dropped.
    """
    dims = [int(d) if isinstance(d, (int, np.integer)) and d > 0 else -1 for d in input_shape]
    return tuple(dims[1:] if len(dims) in (2, 4) else dims)


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


def _starts_like_pickle(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(1) == b"\x80"
