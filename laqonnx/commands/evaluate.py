"""`laqonnx evaluate`: clean and robust accuracy of ONNX models under real attacks, on onnxruntime."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import LaqonnxWarning
from ..vocab import AttackName, AttackPreset, ThreatNorm
from ._common import parse_fraction, parse_positive_int

__all__ = ["add_parser"]

_ATTACKS = AttackName.values()  # as laqonnx.robustness.attacks registers them

def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="measure clean and robust accuracy (worst case over attacks) on the model as onnxruntime runs it",
        description=(
            "Attack each MODEL and score every adversarial example on onnxruntime: white-box attacks on a "
            "differentiable mirror of the graph (QDQ as straight-through fake-quant), transfer attacks from a "
            "float reference, black-box attacks on onnxruntime itself. Robust accuracy is the per-example "
            "worst case over all attacks; a black-box attack beating the white-box ones is flagged as "
            "gradient masking. Inputs are in [0, 1] and EPS is in input units."
        ),
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="ONNX model(s) to evaluate")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="evaluation data: 'digits', an .npz with x and y, an image folder or CIFAR-10 batches "
                        "(the test split is used)")
    p.add_argument("--eps", required=True, type=parse_fraction, metavar="EPS",
                   help="perturbation budget in input units, e.g. 0.1 or 8/255")
    p.add_argument("--norm", choices=ThreatNorm.values(), default=ThreatNorm.INF.value, help="threat-model norm (default: inf)")
    p.add_argument("--preset", choices=AttackPreset.values(), default=AttackPreset.QUICK.value,
                   help="attack budget: quick (seconds), standard (minutes), thorough (long) (default: quick)")
    p.add_argument("--attacks", nargs="+", choices=_ATTACKS, metavar="ATTACK",
                   help=f"run only these attacks, with the preset's budgets; choose from {', '.join(_ATTACKS)}")
    p.add_argument("--reference", metavar="FLOAT_MODEL",
                   help="float model on which transfer attacks are crafted (usually the un-quantized original)")
    p.add_argument("--limit", type=parse_positive_int, metavar="N", help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=parse_positive_int, default=128, metavar="B", help="attack batch size (default: 128)")
    p.add_argument("--threads", type=parse_positive_int, metavar="T",
                   help="onnxruntime and torch threads of the attacks (default: 1) and of the latency "
                        "measurement (default: physical cores)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the attacks (default: 0)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--report", metavar="DIR",
                   help="write a Markdown report with PNG plots to DIR (adds a robust-accuracy-vs-eps sweep)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from ..errors import require

    require("torch", "robustness")
    require("art", "robustness")
    from .._util.io import atomic_write_json, check_output_path
    from ..robustness.evaluate import evaluate, format_table

    if args.json:
        check_output_path(args.json, *args.models, args.reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        report = evaluate(
            args.models, args.data, args.eps, norm=args.norm, preset=args.preset, attacks=args.attacks,
            reference=args.reference, limit=args.limit, batch_size=args.batch_size, latency=not args.no_latency,
            report_dir=args.report, threads=args.threads, seed=args.seed, progress=not args.quiet,
        )
    for w in caught:  # our own notes (LaqonnxWarning) as one line; anything else as Python shows it
        if issubclass(w.category, LaqonnxWarning):
            print(f"laqonnx evaluate: note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(format_table(report))
    if args.json:
        atomic_write_json(args.json, report.to_json())
        print(f"wrote {args.json}", file=sys.stderr)
    if args.report:
        print(f"wrote the report to {args.report}", file=sys.stderr)
    return 0
