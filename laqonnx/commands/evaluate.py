"""`laqonnx evaluate`: clean and robust accuracy of ONNX models under real attacks, on onnxruntime."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import LaqonnxWarning, OutputError
from ..vocab import AttackName, AttackPreset, ThreatNorm
from ._common import parse_fraction, parse_positive_int, parse_range

__all__ = ["add_parser"]

_ATTACKS = AttackName.values()  # as laqonnx.robustness.attacks registers them

DESCRIPTION = """\
Attack each MODEL and score every adversarial example on onnxruntime: white-box attacks on a
differentiable mirror of the graph (QDQ as straight-through fake-quant), transfer attacks from a
float reference, black-box attacks on onnxruntime itself. Robust accuracy is the per-example worst
case over all attacks; a black-box attack beating the white-box ones is flagged as gradient masking.

Units: data are in each model's own units and layout. --input-range LO,HI is the models' valid
input range (default 0,1; --input-range=-1,1 for a model trained with Normalize(0.5, 0.5)): arrays
outside it are refused, the built-in digits/mnist and image folders are mapped onto it, NHWC models
get NHWC data. EPS is in the units of that range (8/255 in [0, 1] is 16/255 in [-1, 1]) and every
adversarial input is clipped to it.

Models made by others: a fixed batch size runs chunk by chunk; an integer input (token ids) gets
clean accuracy, mirror agreement and latency, but no attack (Lp attacks need a continuous input);
--output picks the classifier output of a multi-output model. A model onnxruntime cannot load or
run is reported as failed and the others are evaluated (exit 0 if at least one was, else 2)."""

EPILOG = """\
examples:
  laqonnx evaluate float.onnx int8.onnx --data mnist --eps 0.1 --reference float.onnx
  laqonnx evaluate zuramai.onnx --data mnist --input-range=-1,1 --eps 0.2 --limit 200
  laqonnx evaluate two_outputs.onnx --data test.npz --eps 8/255 --output logits --json eval.json
  laqonnx evaluate float.onnx int8.onnx --data mnist --eps 0.1 --preset standard --ray --workers 2
  laqonnx evaluate *.onnx --data mnist --eps 0.1 --ray=ray://head:10001"""

def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="measure clean and robust accuracy (worst case over attacks) on the model as onnxruntime runs it",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="ONNX model(s) to evaluate")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="labelled evaluation data: digits, mnist, an .npz with x and y in the model's units, an image "
                        "folder or CIFAR-10 batches (the test split is used)")
    p.add_argument("--eps", required=True, type=parse_fraction, metavar="EPS",
                   help="perturbation budget in the units of --input-range, e.g. 0.1 or 8/255 for [0, 1] inputs")
    p.add_argument("--input-range", type=parse_range, default=(0.0, 1.0), metavar="LO,HI",
                   help="the models' valid input range, for the data check, the attacks' clipping and the units of "
                        "EPS (default: 0,1); write --input-range=-1,1 when LO is negative")
    p.add_argument("--output", "--output-name", dest="output", metavar="NAME",
                   help="the classifier output of multi-output models (default: the first)")
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
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the attacks on Ray (pip install 'laqonnx[distributed]'): a local cluster on this "
                        "machine's CPUs, or join ADDRESS (auto, host:port, ray://host:port); same results as without")
    p.add_argument("--workers", type=parse_positive_int, metavar="N",
                   help="Ray worker actors (default: as many as the cluster's CPUs hold, --threads CPUs each)")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from ..errors import require

    require("torch", "robustness")
    require("art", "robustness")
    from .._util.io import atomic_write_json, check_output_path
    from ..robustness.distributed import engine_from_options
    from ..robustness.evaluate import evaluate, format_table

    engine = engine_from_options(args.ray, args.workers)
    if args.json:
        check_output_path(args.json, *args.models, args.reference)
    late: OutputError | None = None  # the report folder failed after the attacks: print and save the results first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            report = evaluate(
                args.models, args.data, args.eps, norm=args.norm, preset=args.preset, attacks=args.attacks,
                reference=args.reference, limit=args.limit, batch_size=args.batch_size, latency=not args.no_latency,
                report_dir=args.report, threads=args.threads, seed=args.seed, progress=not args.no_progress,
                input_range=args.input_range, output=args.output, engine=engine,
            )
        except OutputError as exc:
            if getattr(exc, "report", None) is None:
                raise
            report, late = exc.report, exc
    for w in caught:  # our own notes (LaqonnxWarning) as one line; anything else as Python shows it
        if issubclass(w.category, LaqonnxWarning):
            print(f"laqonnx evaluate: note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(format_table(report))
    if args.json:
        atomic_write_json(args.json, report.to_json())
        print(f"wrote {args.json}", file=sys.stderr)
    if late is not None:
        raise late
    if args.report:
        print(f"wrote the report to {args.report}", file=sys.stderr)
    return 0
