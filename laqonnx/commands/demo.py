"""``laqonnx demo``: train, quantize every way, attack, compare, on the bundled digits data."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import OptionError
from ..vocab import AttackPreset
from ._common import parse_fraction, parse_positive_fraction, parse_positive_int

__all__ = ["add_parser"]

DESCRIPTION = """\
Train a plain and an adversarially (PGD) trained model on scikit-learn's bundled digits
(upsampled to 16x16; cached under $LAQONNX_CACHE or ~/.cache/laqonnx), quantize each with
onnxruntime's baselines (MinMax per-tensor and per-channel, entropy, percentile) and with LAQ at
int8 and at a mixed int4/int8 budget (against onnxruntime with int4 on the largest layers at the
same average weight bits), attack every model on onnxruntime, measure latency side by side, print
one comparison table and write a Markdown report with plots. Nothing is downloaded.
Default: CNN and ResNet-style models, 200 test examples (about 10-15 minutes on 2 cores);
--quick: the ResNet only (the model where int8 beats float on a small CPU), shorter training, 100 examples."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, quantize and attack digits models; print a comparison table and a report",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("laqonnx-demo"), metavar="DIR",
                   help="output folder for the models, results.json, table.txt and report/ (default: ./laqonnx-demo)")
    p.add_argument("--quick", action="store_true", help="the ResNet only, shorter training, 100 examples")
    p.add_argument("--archs", default=None, metavar="A,B",
                   help="comma-separated architectures among cnn, resnet, mobilenet (default: cnn,resnet; --quick: resnet)")
    p.add_argument("--eps", type=parse_fraction, default=0.1,
                   help="L-inf attack radius in input units, pixels in [0, 1], e.g. 0.1 (default, the training eps) or 8/255")
    p.add_argument("--preset", choices=AttackPreset.values(), default=AttackPreset.QUICK.value,
                   help="attack budget preset of 'laqonnx evaluate' (default quick)")
    p.add_argument("--examples", type=parse_positive_int, default=None, metavar="N",
                   help="test examples to evaluate (default 200; --quick: 100)")
    p.add_argument("--mixed-bits", type=parse_positive_fraction, default=6.0, metavar="B",
                   help="nominal average weight bits of the mixed int4/int8 comparison (default 6)")
    p.add_argument("--image-size", type=parse_positive_int, default=16, metavar="S",
                   help="side the 8x8 digits are upscaled to (default 16; 8..64; larger models gain more from int8)")
    p.add_argument("--max-latency", default="0.85x", metavar="BUDGET",
                   help="the laq-latency row's budget: 0.85x (default, of the float model) or an absolute 0.2ms, batch 1")
    p.add_argument("--seed", type=int, default=0, help="training and attack seed (default 0)")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from ..zoo.demo import QUICK, DemoConfig, run_demo

    over: dict = dict(QUICK) if args.quick else {}
    if args.archs:
        over["archs"] = tuple(a.strip() for a in args.archs.split(",") if a.strip())
        from ..zoo.models import ARCHITECTURES

        bad = [a for a in over["archs"] if a not in ARCHITECTURES or a == "resnet18"]
        if bad or not over["archs"]:
            raise OptionError(f"--archs takes cnn, resnet, mobilenet, not {args.archs!r}")
    if args.examples is not None:
        over["n_eval"] = args.examples
    config = DemoConfig(out_dir=args.out, quick=args.quick, eps=args.eps, preset=args.preset,  # OptionError: one line
                        mixed_bits=args.mixed_bits, seed=args.seed, image_size=args.image_size,
                        max_latency=args.max_latency, **over)
    result = run_demo(config, progress=not args.no_progress)
    print(result.table)
    print()
    print(f"robust = worst case over the '{config.preset}' attacks at eps={config.eps:g} on "
          f"{config.n_eval} test examples, scored on onnxruntime; Δrobust vs the float model; "
          "latency p50 at batch 1, measured interleaved, ×float = p50 / float p50 (below 1 is faster); "
          "w-bits = average weight bits")
    print(f"done in {result.seconds:.0f} s; results: {result.results_json} (table: {result.results_json.with_name('table.txt')})")
    print(f"report: {result.report}")
    print(f"models: {result.models}/<arch>-<training>/ (float.onnx, the float model, and one .onnx per method)")
    return 0
