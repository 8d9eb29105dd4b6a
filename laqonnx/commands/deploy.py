"""`laqonnx deploy`: one ONNX file from encoded image bytes to classes (onnxruntime-extensions)."""

from __future__ import annotations

import argparse

from ..vocab import ChannelOrder
from ._common import parse_floats, parse_positive_int

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="embed image decoding, preprocessing and top-k in the model (onnxruntime-extensions)",
        description=(
            "Write one ONNX file whose input is the bytes of a PNG or JPEG image (uint8, 1-D, named "
            "image_bytes) and whose outputs are class_index (int64), topk_scores, topk_indices and, with "
            "--labels, topk_labels. It refuses bytes that are not a PNG or a well-formed JPEG, and images "
            "declaring more than --max-image-pixels, before decoding (a session error), decodes, resizes the "
            "shorter side to --resize, center-crops --image-size, scales to [0, 1], normalizes, runs the (float or quantized) network and takes "
            "softmax + top-k. Serving needs onnxruntime plus onnxruntime-extensions (laqonnx[deploy]), "
            "with so.register_custom_ops_library(onnxruntime_extensions.get_library_path())."
        ),
    )
    p.add_argument("model", help="input .onnx classifier with one (N, C, S, S) float input, C = 1 or 3 (S may be dynamic)")
    p.add_argument("-o", "--output", required=True, help="path of the deployed .onnx file to write")
    p.add_argument("--image-size", type=parse_positive_int, metavar="S",
                   help="center-crop size, the model's input size (default: read from the model); a model whose "
                        "spatial size is dynamic needs it and is fixed to S x S (checked by running it once)")
    p.add_argument("--resize", type=parse_positive_int, metavar="R",
                   help="resize the shorter image side to R before the crop (default: S)")
    p.add_argument("--mean", type=parse_floats, default=(0.0,), metavar="M1,M2,M3",
                   help="per-channel mean subtracted after scaling to [0, 1] (1 or C values; default 0)")
    p.add_argument("--std", type=parse_floats, default=(1.0,), metavar="S1,S2,S3",
                   help="per-channel std divided by after the mean (1 or C values; default 1)")
    p.add_argument("--channels", choices=ChannelOrder.values(),
                   help="channel order the model expects (default: gray for 1-channel models, rgb for 3)")
    p.add_argument("--labels", metavar="FILE", help="text file with one class label per line: adds topk_labels")
    p.add_argument("--top-k", type=parse_positive_int, metavar="K", help="number of top classes to output (default min(5, classes))")
    p.add_argument("--max-image-pixels", type=parse_positive_int, metavar="P",
                   help="refuse images declaring more than P pixels (width x height in the PNG/JPEG header) before "
                        "decoding them, a session error (default 40000000, 40 MP: an accepted image costs about 6.4 "
                        "bytes per pixel, ~0.24 GiB at the default, plus 2-9 bytes per byte of the file: cap uploads too)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from ..deployment import deploy

    result = deploy(  # an invalid option is an OptionError: laqonnx.cli prints it as one line
        args.model, args.output, image_size=args.image_size, resize=args.resize, mean=args.mean,
        std=args.std, channels=args.channels, labels=args.labels, top_k=args.top_k,
        max_image_pixels=args.max_image_pixels,
    )
    o = result.options
    print(
        f"wrote {result.path}: input {result.input_name} (uint8 encoded PNG/JPEG bytes) -> "
        f"{', '.join(result.output_names)}; {o.channels}, shorter side {o.resize}, crop {o.image_size}, "
        f"mean {list(o.mean)}, std {list(o.std)}, top-{o.top_k} of {result.num_classes} classes; "
        f"images over {o.max_image_pixels:_} pixels refused"
    )
    return 0
