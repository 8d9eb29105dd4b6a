"""`laqonnx quantize`: layer-wise adversarial-aware int8 quantization of an ONNX model."""

from __future__ import annotations

import argparse
import sys

from ..vocab import ActivationMethod, Baseline, Objective, ThreatNorm, WeightMethod
from ._common import parse_fraction, parse_positive_fraction, parse_positive_int, parse_shape, parse_subset

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize an ONNX model to int8 (QDQ), choosing settings layer by layer",
        description=(
            "Choose, layer by layer, the weight and activation quantization settings that minimise a "
            "linearised bound on adversarial + quantization loss (Lipschitz constants measured on the "
            "model, activation errors on calibration data), optionally under a size budget solved "
            "exactly, and write a QDQ model through onnxruntime's own quantizer, plus OUT.plan.json."
        ),
    )
    p.add_argument("model", help="the float ONNX model (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the quantized model (.onnx)")
    p.add_argument("--calib", help="calibration data: digits, a .npz (x in [0,1]), an image folder or CIFAR batches")
    p.add_argument("--eps", type=parse_fraction, default=8 / 255, help="attack radius in input units, e.g. 8/255 (default)")
    p.add_argument("--norm", choices=ThreatNorm.values(), default=ThreatNorm.INF.value, help="threat model norm (L-inf radius is converted to L2 by sqrt(input size))")
    p.add_argument("--objective", choices=Objective.values(), default=Objective.LAQ.value, help="laq: both terms (default); mse: quantization term only; lipschitz: adversarial term only")
    p.add_argument("--avg-weight-bits", type=parse_positive_fraction, metavar="B", help="budget: parameter-weighted average weight bits (mixes int8/int4)")
    p.add_argument("--max-bytes", type=parse_positive_int, metavar="N", help="budget: model bytes (estimated from initializer sizes)")
    p.add_argument(
        "--adversarial-calib", nargs="?", const=True, default=None, metavar="NPZ",
        help="also calibrate on adversarial examples: alone, PGD-Linf at --eps on the float model; with a path, examples from that data",
    )
    p.add_argument("--plan", metavar="PLAN.json", help="re-apply an (edited) plan instead of scoring; ranges are recomputed if --calib is given")
    p.add_argument("--baseline", choices=Baseline.values(), help="also write onnxruntime's plain quantize_static model (OUT.<baseline>.onnx)")
    p.add_argument("--per-channel", action="store_true", help="per-channel weights only (and for --baseline); default scores per-tensor and per-channel")
    p.add_argument(
        "--weight-methods", type=parse_subset(WeightMethod.values()), metavar="M,..",
        help="weight-range candidates to score, among maxabs,mse,percentile (default: all three); fewer is faster: "
             "every candidate costs an operator norm of its quantization error per layer",
    )
    p.add_argument(
        "--activation-methods", type=parse_subset(ActivationMethod.values()), metavar="M,..",
        help="input-activation range candidates, among minmax,percentile,entropy,mse (default: all four)",
    )
    p.add_argument("--input-shape", type=parse_shape, metavar="SHAPE", help="model input shape if dynamic, batch first, e.g. 1,3,32,32")
    p.add_argument("--calib-limit", type=parse_positive_int, metavar="N", help="use the first N calibration examples")
    p.add_argument("--allow-float", action="store_true", help="with a budget, allow leaving layers in float")
    p.add_argument("--norm-max-spatial", type=parse_positive_int, default=32, metavar="S", help="cap the spatial size of conv operator norms (default 32)")
    p.add_argument("--json", metavar="OUT.json", help="write the result summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from .._util.io import atomic_write_json, check_output_path
    from ..quant.workflow import quantize
    from ..report import format_table

    if args.json:
        check_output_path(args.json, args.model, args.plan)
    candidates = None
    if args.weight_methods or args.activation_methods:
        from ..quant.metric import CandidateSpace  # with --plan, quantize() refuses them

        default = CandidateSpace()
        candidates = CandidateSpace(weight_methods=args.weight_methods or default.weight_methods,
                                    activation_methods=args.activation_methods or default.activation_methods)
    result = quantize(
        args.model,
        args.output,
        args.calib,
        eps=args.eps,
        norm=args.norm,
        objective=args.objective,
        avg_weight_bits=args.avg_weight_bits,
        max_bytes=args.max_bytes,
        adversarial_calib=args.adversarial_calib,
        plan=args.plan,
        baseline=args.baseline,
        per_channel=True if args.per_channel else None,
        input_shape=args.input_shape,
        calib_limit=args.calib_limit,
        allow_float=args.allow_float,
        progress=not args.no_progress,
        norm_max_spatial=args.norm_max_spatial,
        candidates=candidates,
    )
    rows = []
    for lp in result.plan.layers:
        w, a = lp.chosen.describe()
        score = next((s for s in lp.scores if s.candidate == lp.chosen), None)
        rows.append(
            {
                "layer": lp.name,
                "weight": w,
                "activation": a,
                "L": lp.operator_norm,
                "Lhat": None if score is None else score.lhat,
                "adv": None if score is None else score.adversarial,
                "quant": None if score is None else score.quantization,
                "metric": None if score is None else score.metric,
            }
        )
    cols = [
        ("layer", "layer"), ("weight", "weight"), ("activation", "input activation"), ("L", "L"),
        ("Lhat", "L̂"), ("adv", "adv term"), ("quant", "quant term"), ("metric", "metric"),
    ]
    print(format_table(rows, cols))
    plan = result.plan
    print(
        f"objective {plan.objective}, eps {plan.eps:.4g} (L{plan.norm}, L2 radius {plan.eps_l2:.4g}), "
        f"network bound {plan.network_bound if plan.network_bound is None else format(plan.network_bound, '.4g')}, "
        f"activation stats: {plan.activation_stats}"
    )
    print(
        f"average weight bits {result.avg_weight_bits:.3g}; size {result.size_bytes} bytes "
        f"(float {result.float_size_bytes}); {result.timings.get('total', 0.0):.1f} s"
    )
    for w in result.warnings:
        print(f"note: {w}", file=sys.stderr)
    print(f"wrote {result.output}")
    print(f"wrote {result.plan_path}")
    if result.baseline_output is not None:
        print(f"wrote {result.baseline_output} (onnxruntime {args.baseline})")
    if args.json:
        atomic_write_json(args.json, result.to_json())
        print(f"wrote {args.json}")
    return 0
