"""`laqonnx quantize`: layer-wise adversarial-aware int8 quantization of an ONNX model."""

from __future__ import annotations

import argparse
import sys

from ..vocab import ActivationMethod, Baseline, Objective, RoundingMode, ThreatNorm, WeightMethod
from ._common import (parse_fraction, parse_max_latency, parse_positive_fraction, parse_positive_int, parse_range, parse_shape,
                      parse_subset)

__all__ = ["add_parser"]

DESCRIPTION = """\
Choose, layer by layer, the weight and activation quantization settings of an ONNX classifier and
write a QDQ model through onnxruntime's own quantizer, plus OUT.plan.json (reviewable, editable,
re-appliable with --plan).

Each candidate setting is scored by what it does to the logits, measured on the calibration data
through the float model's local gains (its Jacobian, by backward passes through a differentiable
mirror): the quantization term (the logit error on clean examples) plus the adversarial term (how
much the setting changes the model's response to PGD examples crafted on the float model at --eps,
made automatically; --no-adversarial-calib skips them). Under a budget (--avg-weight-bits or
--max-bytes) the choice is an exact knapsack. Before writing, a guard measures the chosen plan, the
two ablations' plans and the uniform rule at the same budget through onnxruntime on calibration
examples and keeps the best. The written model is loaded and run in onnxruntime, and its top-1
agreement with the float model is printed (a warning below 90%).

Data is in the model's own units and layout: [0, 1] images by default, --input-range for others
(e.g. --input-range=-1,1); NHWC models get NHWC data; integer-input models get no QDQ on their
integer paths."""

EPILOG = """\
examples:
  laqonnx quantize model.onnx -o model.int8.onnx --calib calib.npz --eps 8/255
  laqonnx quantize model.onnx -o model.mixed.onnx --calib calib.npz --avg-weight-bits 6
  laqonnx quantize mnist.onnx -o mnist.int8.onnx --calib mnist --eps 0.1 --baseline ort-minmax
  laqonnx quantize model.onnx -o again.onnx --plan model.int8.plan.json --calib calib.npz"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize an ONNX model to int8 (QDQ), choosing settings layer by layer",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the float ONNX model (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the quantized model (.onnx)")
    p.add_argument("--calib", help="calibration data in the model's units: digits, mnist, a .npz (x, optional y), an image "
                                   "folder or CIFAR batches")
    p.add_argument("--eps", type=parse_fraction, default=8 / 255,
                   help="attack radius in input units, e.g. 8/255 (default) or 0.1; 0 turns the adversarial term off")
    p.add_argument("--norm", choices=ThreatNorm.values(), default=ThreatNorm.INF.value, help="threat model norm (default inf)")
    p.add_argument("--objective", choices=Objective.values(), default=Objective.LAQ.value,
                   help="laq: both terms (default); mse: the quantization term only; lipschitz: the adversarial term only")
    p.add_argument("--avg-weight-bits", type=parse_positive_fraction, metavar="B",
                   help="budget: parameter-weighted average weight bits (mixes int8/int4)")
    p.add_argument("--max-bytes", type=parse_positive_int, metavar="N", help="budget: model bytes (from initializer sizes)")
    p.add_argument("--max-latency", type=parse_max_latency, metavar="0.7x|3.5ms",
                   help="budget: latency on this CPU, relative to the float model (0.7x) or absolute (3.5ms), over per-layer "
                        "costs measured by onnxruntime's profiler (cached); the written model is measured against it")
    p.add_argument("--latency-batch", type=parse_positive_int, default=1, metavar="N",
                   help="batch size of --max-latency (default 1)")
    adv = p.add_mutually_exclusive_group()
    adv.add_argument("--adversarial-calib", nargs="?", const=True, default=None, metavar="NPZ",
                     help="alone: PGD examples at --eps on the float model (the default when eps > 0); with a path: "
                          "adversarial examples from that data, paired by index with --calib")
    adv.add_argument("--no-adversarial-calib", action="store_true",
                     help="calibrate on clean data only (no PGD examples; the adversarial term is then 0)")
    p.add_argument("--input-range", type=parse_range, metavar="LO,HI",
                   help="the model's valid input range, for the data check and the PGD examples (default: 0,1 if the "
                        "calibration data lie in it, else their own range); write --input-range=-1,1")
    p.add_argument("--output-name", metavar="NAME", help="the classifier output of a multi-output model (default: the first)")
    p.add_argument("--plan", metavar="PLAN.json", help="re-apply an (edited) plan instead of scoring; ranges are recomputed if --calib is given")
    p.add_argument("--baseline", choices=Baseline.values(), help="also write onnxruntime's plain quantize_static model (OUT.<baseline>.onnx)")
    p.add_argument("--per-channel", action="store_true", help="per-channel weights only (and for --baseline); default scores per-tensor and per-channel")
    p.add_argument("--weight-methods", type=parse_subset(WeightMethod.values()), metavar="M,..",
                   help="weight-range candidates to score, among maxabs,mse,percentile (default: all three)")
    p.add_argument("--activation-methods", type=parse_subset(ActivationMethod.values()), metavar="M,..",
                   help="input-activation range candidates, among minmax,percentile,entropy,mse (default: all four)")
    p.add_argument("--rounding", choices=RoundingMode.values(), default=None,
                   help="auto (default): adaptive rounding (learned per weight on clean and adversarial activations) is a "
                        "candidate of the int4 per-channel settings, chosen where the metric says it pays; nearest: never; "
                        "adaptive: forced on every layer (slower: one optimisation per layer and setting)")
    p.add_argument("--reduce-range", choices=("auto", "on", "off"), default="auto",
                   help="int8 weights in 7 bits ([-64, 63]). auto (default): on when this CPU is x86 without VNNI/AMX "
                        "(AVX2), where onnxruntime's int8 kernels saturate full-range weights and silently corrupt "
                        "outputs; off for a model that will only run on VNNI/AMX or Arm CPUs")
    p.add_argument("--activation-bits", type=int, choices=(4, 8, 16), default=None,
                   help="bits of the layer-input activations scored (default 8; 16 keeps more precision, unfused; 4 is "
                        "uint4 with int4 weights (W4A4), which onnxruntime runs unfused: for low-bit studies)")
    p.add_argument("--input-shape", type=parse_shape, metavar="SHAPE", help="model input shape if dynamic, batch first, e.g. 1,3,32,32")
    p.add_argument("--calib-limit", type=parse_positive_int, metavar="N", help="use the first N calibration examples (default: up to 1024)")
    p.add_argument("--metric-examples", type=parse_positive_int, default=64, metavar="N",
                   help="calibration examples (and as many adversarial ones) the metric is measured on (default 64)")
    p.add_argument("--allow-float", action="store_true", help="with a budget, allow leaving layers in float")
    p.add_argument("--no-guard", action="store_true",
                   help="write the objective's own choice without comparing it with the alternatives")
    p.add_argument("--robust-guard", action="store_true",
                   help="let the guard keep the most robust alternative: each is attacked white-box (PGD-10 on its own "
                        "mirror) on up to 256 clean calibration inputs and scored on onnxruntime; alternatives within "
                        "1 point of the most robust are decided by the measured loss (needs torch; eps > 0)")
    p.add_argument("--no-latency-check", action="store_true",
                   help="skip timing the float and the written model after writing (batch 1, < 1 s on small models; "
                        "a quantized model slower than float gets a note)")
    p.add_argument("--json", metavar="OUT.json", help="write the result summary as JSON")
    p.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _run(args: argparse.Namespace) -> int:
    from .._util.io import atomic_write_json, check_output_path
    from ..errors import OptionError
    from ..quant.guard import RobustGuard
    from ..quant.workflow import quantize
    from ..report import format_bytes, format_table

    if args.robust_guard and (args.no_guard or args.plan):
        raise OptionError("--robust-guard is a mode of the guard: it does not go with --no-guard or --plan")
    if args.json:
        check_output_path(args.json, args.model, args.plan)
    candidates = None
    if args.weight_methods or args.activation_methods or args.activation_bits:
        from ..quant.metric import CandidateSpace  # with --plan, quantize() refuses them

        default = CandidateSpace()
        candidates = CandidateSpace(weight_methods=args.weight_methods or default.weight_methods,
                                    activation_methods=args.activation_methods or default.activation_methods,
                                    activation_bits=(args.activation_bits,) if args.activation_bits else default.activation_bits,
                                    weight_bits=(4,) if args.activation_bits == 4 else default.weight_bits)
    adversarial = False if args.no_adversarial_calib else args.adversarial_calib
    reduce_range = None if args.reduce_range == "auto" else args.reduce_range == "on"
    if reduce_range is None and candidates is not None and not args.plan:
        from ..latency import cpu_info

        reduce_range = cpu_info().int8_saturates()
    result = quantize(
        args.model, args.output, args.calib, eps=args.eps, norm=args.norm, objective=args.objective,
        avg_weight_bits=args.avg_weight_bits, max_bytes=args.max_bytes, adversarial_calib=adversarial, plan=args.plan,
        baseline=args.baseline, per_channel=True if args.per_channel else None, input_shape=args.input_shape,
        output_name=args.output_name, input_range=args.input_range, calib_limit=args.calib_limit,
        allow_float=args.allow_float, guard=RobustGuard() if args.robust_guard else not args.no_guard,
        metric_examples=args.metric_examples,
        rounding=args.rounding, progress=not args.no_progress, candidates=candidates,
        latency_check=not args.no_latency_check, max_latency=args.max_latency, latency_batch=args.latency_batch,
        reduce_range=reduce_range,
    )
    plan = result.plan
    ranges = plan.range_map()
    rows = []
    for lp in plan.layers:
        w, a = lp.chosen.describe()
        ws = next((s for s in lp.scores if s.setting == lp.chosen.weight), None)
        r = ranges.get(lp.activation_source)
        acts = next((s for s in r.scores if s.setting == lp.chosen.activation), None) if r is not None else None
        rows.append({"layer": lp.name, "weight": w, "activation": a,
                     "wq": None if ws is None else ws.clean, "wa": None if ws is None else ws.adversarial,
                     "aq": None if acts is None else acts.clean, "aa": None if acts is None else acts.adversarial})
    cols = [("layer", "layer"), ("weight", "weight"), ("activation", "input activation"),
            ("wq", "weight quant"), ("wa", "weight adv"), ("aq", "act quant"), ("aa", "act adv")]
    print(format_table(rows, cols))
    print(f"objective {plan.objective}, eps {plan.eps:.4g} (L{plan.norm}), input range {plan.input_range}, "
          f"adversarial calibration: {plan.adversarial_calib}; terms in squared centred-logit units, measured on "
          f"{plan.metric.get('examples', '?')} examples ({plan.metric.get('engine', '?')})")
    if plan.guard is not None:
        losses = ", ".join(f"{k} {v:.4g}" for k, v in plan.guard.losses.items())
        print(f"guard (measured calibration loss, lower is better): {losses}; kept {plan.guard.kept}")
        if plan.guard.robust is not None:
            agree = ", ".join(f"{k} {v:.3f}" for k, v in plan.guard.robust.items())
            print(f"guard (robust agreement under PGD on {plan.guard.robust_examples} calibration inputs, higher is better): {agree}")
    agree = "not measured" if result.agreement is None else f"{result.agreement:.1%}"
    print(f"average weight bits {result.avg_weight_bits:.3g}; size {format_bytes(result.size_bytes)} "
          f"(float {format_bytes(result.float_size_bytes)}); top-1 agreement with float {agree}; "
          f"{result.timings.get('total', 0.0):.1f} s")
    if result.latency is not None:
        print(f"latency at batch 1 (interleaved medians): quantized {result.latency.quantized_ms:.3g} ms, "
              f"float {result.latency.float_ms:.3g} ms ({result.latency.ratio:.2f}x)")
    for w in result.warnings:
        print(f"note: {w}", file=sys.stderr)
    print(f"wrote {result.output}")
    print(f"wrote {result.plan_path}")
    if plan.rounding_file:
        print(f"wrote {result.plan_path.with_name(plan.rounding_file)} (the adaptive layers' integer weights; keep it beside the plan)")
    if result.baseline_output is not None:
        agree = "" if result.baseline_agreement is None else f", top-1 agreement with float {result.baseline_agreement:.1%}"
        print(f"wrote {result.baseline_output} (onnxruntime {args.baseline}{agree})")
    if args.json:
        atomic_write_json(args.json, result.to_json())
        print(f"wrote {args.json}")
    return 0
