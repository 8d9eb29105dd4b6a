"""Build a calibration ``.npz`` (``x`` float32 in [0, 1], ``y`` int64) with a model's preprocessing.

The source is anything :func:`laqonnx.data.open_data` reads: an image folder (one sub-folder per
class), a ``.npz``, CIFAR python batches, or ``digits``. Images are converted to the model's
channel count (RGB or gray), resized to its H x W (bilinear) and scaled to [0, 1]; ``--samples``
examples are drawn at random without replacement (seeded), kept in source order.

    python calibration/make_calib.py photos/ --model model.onnx --samples 512 -o calib.npz
    python calibration/make_calib.py cifar-10-batches-py --split train --shape 3,32,32 -o c.npz
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence

import numpy as np


def model_input_shape(path: str) -> tuple[int, ...]:
    """Per-example input shape of an ONNX model (batch axis dropped); refuses dynamic sizes."""
    import onnx

    from laqonnx.errors import ModelError

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # onnx raises several types for unreadable files
        raise ModelError(f"cannot read model {path}: {exc}") from exc
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected one input, found {len(inputs)}")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inputs[0].type.tensor_type.shape.dim][1:]
    if not dims or min(dims) < 1:
        raise ModelError(f"{path}: input {inputs[0].name!r} has a dynamic size {dims}; pass --shape C,H,W")
    return tuple(dims)


def build(
    source: str,
    shape: Sequence[int],
    samples: int | None,
    *,
    seed: int = 0,
    split: str = "train",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``source`` adapted to ``shape`` ((C, H, W) or (D,)); return ``samples`` random examples."""
    from tqdm import tqdm

    from laqonnx.data import Resized, Subset, open_data
    from laqonnx.errors import DataError

    shape = tuple(int(d) for d in shape)
    image_shape = shape
    if len(shape) == 1:  # a flat model input: prepare square gray images, then flatten
        side = int(round(np.sqrt(shape[0])))
        if side * side != shape[0]:
            raise DataError(f"cannot make images for a flat input of size {shape[0]}: not a square")
        image_shape = (1, side, side)
    is_digits = source.startswith("digits")
    try:
        src = open_data(source, input_shape=image_shape, split=split)
    except DataError:
        if is_digits:
            raise
        src = open_data(source, split=split)  # e.g. an .npz of another size: resized below
    if tuple(src.sample_shape) != image_shape:
        src = Resized(src, image_shape)
    n = len(src) if samples is None else min(int(samples), len(src))
    if n < 1:
        raise DataError(f"{source}: no examples")
    index = np.sort(np.random.default_rng(seed).choice(len(src), size=n, replace=False))
    subset = Subset(src, index)
    xs, ys = [], []
    with tqdm(total=n, desc="preparing", unit="ex", disable=not progress, file=sys.stderr) as bar:
        for x, y in subset.batches(64):
            xs.append(x.reshape(len(x), *shape))
            ys.append(y)
            bar.update(len(x))
    x = np.concatenate(xs).astype(np.float32)
    y = None if ys[0] is None else np.concatenate(ys).astype(np.int64)
    return x, y


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a calibration .npz with a model's preprocessing.")
    parser.add_argument("source", help="image folder, .npz, CIFAR batches folder/file, or digits[:train|:test]")
    parser.add_argument("-o", "--output", required=True, help="output .npz (x float32 in [0, 1], y int64)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="ONNX model whose input shape (C, H, W) the data must fit")
    group.add_argument("--shape", help="input shape without the batch axis, e.g. 3,224,224 or 64")
    parser.add_argument(
        "--samples", type=int, default=512, help="number of examples drawn at random (default 512; 0 = all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draw")
    parser.add_argument("--split", default="train", help="digits split / CIFAR batches to read (train, test, all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    from laqonnx._util.io import atomic_write_bytes, check_output_path
    from laqonnx.errors import LaqonnxError

    try:
        check_output_path(args.output, args.source, args.model)
        if args.shape:
            try:
                shape = tuple(int(v) for v in args.shape.split(","))
            except ValueError:
                parser.error(f"--shape must be integers separated by commas, got {args.shape!r}")
        else:
            shape = model_input_shape(args.model)
        x, y = build(
            args.source, shape, args.samples or None, seed=args.seed, split=args.split, progress=not args.no_progress
        )
        buf = io.BytesIO()
        np.savez_compressed(buf, **({"x": x} if y is None else {"x": x, "y": y}))
        atomic_write_bytes(args.output, buf.getvalue())
    except LaqonnxError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    labels = "" if y is None else f", y {y.shape}"
    print(f"wrote {args.output}: x {x.shape} float32 in [{x.min():.3f}, {x.max():.3f}]{labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
