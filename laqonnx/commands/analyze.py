"""`laqonnx analyze`: per-layer Lipschitz constants, weight-quantization errors, network bound."""

from __future__ import annotations

import argparse
import sys

from ._common import parse_positive_fraction, parse_positive_int, parse_range, parse_shape

__all__ = ["add_parser", "format_table"]

DESCRIPTION = """\
Analyse an ONNX model, float or quantized (QDQ: weights are dequantized, activation
quantization counts as identity, and a "bits" column shows each stored weight's bits). BatchNormalization is folded into the preceding
Conv, shapes are inferred, and for every weighted layer (Conv, ConvTranspose, Gemm, MatMul with a
constant operand) it prints:
  - the Lipschitz constant: the L2 operator norm of the layer's linear map at its input shape
    (convolutions: the true operator with its stride, padding, dilation and groups);
  - the relative weight error ||W - Q(W)|| / ||W|| of symmetric int8 and int4 quantization,
    per-tensor and per-channel;
then the whole-network Lipschitz bound (input -> output, over the graph), and warnings: a CPU
without int8 dot-product instructions (VNNI/AMX), ops without a bound rule, skipped layers.

A bound through an op without a rule is "unknown" (JSON null), never 0. Products of two
activations (squeeze-excitation, attention), Exp, Sqrt, Div by an activation have no bound valid
for every input: with --calib DATA their value ranges are calibrated on DATA and they are bounded
there; the bound is then marked "data-dependent (on the calibration data)"."""

EPILOG = """\
examples:
  laqonnx analyze model.onnx
  laqonnx analyze model.onnx --input-shape 1,3,32,32 --json analysis.json
  laqonnx analyze mobilenet.onnx --calib calib.npz --calib-size 256"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="per-layer Lipschitz constants, int8/int4 weight errors and the network bound of a float model",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="the ONNX model, float or QDQ-quantized (.onnx; external data next to it is loaded)")
    p.add_argument(
        "--input-shape",
        type=parse_shape,
        metavar="N,C,H,W",
        help="input shape, batch first (needed when the model's spatial size is dynamic), e.g. 1,3,32,32",
    )
    p.add_argument("--calib", metavar="DATA",
                   help="calibration data in the model's units (digits, mnist, a .npz, an image folder or CIFAR batches): "
                        "bounds products, Exp, ... on it (data-dependent bound)")
    p.add_argument("--calib-size", type=parse_positive_int, metavar="N",
                   help="use the first N calibration examples (default: up to 1024)")
    p.add_argument("--input-range", type=parse_range, metavar="LO,HI",
                   help="the model's valid input range, to check the calibration data (default: 0,1 if the data lie in "
                        "it, else their own range); write --input-range=-1,1")
    p.add_argument("--json", metavar="OUT", help="also write the analysis as JSON to OUT")
    p.add_argument("--tol", type=parse_positive_fraction, default=1e-4, help="relative tolerance of iterative operator norms (default 1e-4)")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run)


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "unknown" if x is None else format(x, spec)


def _bits(x) -> str:
    if x.weight_bits is None:
        return "float"
    return f"{x.weight_bits} {'C' if x.weight_granularity == 'per_channel' else 'T'}"


def _bound_text(analysis) -> str:
    if analysis.network_bound is None:
        missing = ", ".join(analysis.unknown_ops)
        return "unknown" + (f" (no bound for: {missing})" if missing else "")
    if str(analysis.bound_kind) == "data-dependent":
        return f"{_fmt(analysis.network_bound)}, data-dependent (on the calibration data)"
    return _fmt(analysis.network_bound)


def format_table(analysis) -> str:
    quantized = any(x.weight_bits is not None for x in analysis.layers)
    head = ("layer", "op", "weight shape", *(("bits",) if quantized else ()), "Lipschitz", "method",
            "int8 T", "int8 C", "int4 T", "int4 C")
    rows = [head]
    for x in analysis.layers:
        e = x.weight_error
        rows.append((
            x.name, x.op_type, "x".join(map(str, x.weight_shape)), *((_bits(x),) if quantized else ()),
            _fmt(x.lipschitz), x.lipschitz_method,
            f"{e.int8_per_tensor:.2%}", f"{e.int8_per_channel:.2%}", f"{e.int4_per_tensor:.2%}", f"{e.int4_per_channel:.2%}",
        ))
    method_col = head.index("method")
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 or i == method_col else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("weight error = ||W - Q(W)||/||W||, symmetric max-abs; T per-tensor, C per-channel")
    if quantized:
        lines.append("bits: the stored weight's bits (QDQ model; Lipschitz and errors use the dequantized weight)")
    shape = ",".join(map(str, analysis.input_shape))
    lines.append(f"network Lipschitz bound (input {shape} -> output, L2): {_bound_text(analysis)}")
    for w in analysis.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .._util.io import atomic_write_json, check_output_path
    from ..errors import OptionError
    from ..lipschitz.analyze import analyze

    if args.json:
        check_output_path(args.json, args.model)
    if (args.calib_size is not None or args.input_range is not None) and args.calib is None:
        raise OptionError("--calib-size and --input-range need --calib DATA")
    analysis = analyze(args.model, args.input_shape, progress=not args.no_progress, tol=args.tol, calib=args.calib,
                       calib_size=args.calib_size, input_range=args.input_range)
    print(format_table(analysis))
    if args.json:
        atomic_write_json(args.json, analysis.to_json())
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
