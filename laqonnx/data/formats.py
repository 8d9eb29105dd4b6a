"""Readers of the data formats: ``.npz`` files, image folders (one sub-folder per class, read
lazily with Pillow), CIFAR-10/100 python batches (through a restricted unpickler that refuses
every global except the numpy array constructors such files need) and scikit-learn's digits."""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sources import UNIT_RANGE, ArraySource, DataSource, Resized, _model_shape

__all__ = ["ImageFolderSource", "load_cifar_batch", "IMAGE_EXTENSIONS", "SPLITS"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
SPLITS = ("train", "test", "all")


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
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        files = [path / n for n in names[split] if (path / n).is_file()]
        if not files:
            raise DataError(f"{path}: no CIFAR {split} batches ({', '.join(names[split])})")
    else:
        files = [path]
    parts = [load_cifar_batch(f) for f in files]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return ArraySource(x, y, name=f"cifar:{path}", num_classes=max(p[2] for p in parts))


def _open_npz(path: Path, input_range: tuple[float, float] | None = UNIT_RANGE, integer_input: bool = False) -> DataSource:
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
    return ArraySource(x, y, name=f"npz:{path}", input_range=input_range, integer_input=integer_input)


def _open_digits(split: str, input_shape: Sequence[int] | None) -> DataSource:
    from ..zoo.digits import NUM_CLASSES, load_digits

    if split not in SPLITS:
        raise DataError(f"digits split must be one of {', '.join(SPLITS)}, got {split!r}")
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


def _open_mnist(split: str, input_shape: Sequence[int] | None) -> DataSource:
    from ..zoo.mnist import NUM_CLASSES, load_mnist

    if split not in SPLITS:
        raise DataError(f"mnist split must be one of {', '.join(SPLITS)}, got {split!r}")
    x, y = load_mnist(split)
    source: DataSource = ArraySource(x, y, name=f"mnist:{split}", num_classes=NUM_CLASSES)
    shape = _model_shape(input_shape) if input_shape is not None else (1, 28, 28)
    if len(shape) == 1:
        if shape[0] not in (-1, 28 * 28):
            raise DataError(f"mnist digits are 28x28: cannot flatten them to a model input of size {shape[0]}")
        return ArraySource(x.reshape(len(x), -1), y, name=f"mnist:{split}", num_classes=NUM_CLASSES)
    c, h, w = (1 if shape[0] < 0 else shape[0]), (28 if shape[1] < 0 else shape[1]), (28 if shape[2] < 0 else shape[2])
    if (c, h, w) != (1, 28, 28):
        source = Resized(source, (c, h, w))
    return source


def _starts_like_pickle(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(1) == b"\x80"
