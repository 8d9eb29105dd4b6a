"""End-to-end `laqonnx.quantize` time vs onnxruntime's `quantize_static` (MinMax, per-channel).

Same ResNet-18-sized model (random weights, 3x224x224, BatchNorm folded by both tools), same
calibration images (64 uniform-random images in [0, 1], batches of 32), measured side by side:
the two tools alternate, each run in a fresh output folder, >= 3 runs each; medians and their ratio
(target: ours / onnxruntime <= 1.5). Also recorded: our per-stage timings (median), and the lowering
alternatives on the same model: our `lower` (onnxruntime's QDQQuantizer fed with our
ranges) vs `quantize_static` with the same planned weights as TensorQuantOverrides (which runs
onnxruntime's own calibration pass again); and the scoring floor: scoring with every weight-error
norm replaced by 0, i.e. what any cheaper estimator of that term could at best bring.

    python benchmarks/quantize_time.py            # full: 224x224, 3 runs each
    python benchmarks/quantize_time.py --quick    # 112x112, width 32, 3 runs each
    python benchmarks/quantize_time.py --narrower # also the narrower candidate sets (--per-channel, --weight-methods maxabs)

Writes benchmarks/results/quantize_time.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _resnet18(width: int, image_size: int):
    import torch

    try:
        from laqonnx.zoo.models import resnet18_like

        net = resnet18_like(num_classes=1000, in_channels=3, width=width, image_size=image_size)
        source = "laqonnx.zoo.models.resnet18_like"
    except ImportError:  # pragma: no cover - zoo not installed
        raise SystemExit("laqonnx.zoo.models.resnet18_like is needed (pip install 'laqonnx[robustness]')")
    torch.manual_seed(0)
    for m in net.modules():  # random but non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval(), source


def _export(net, image_size: int, path: Path) -> None:
    from laqonnx.zoo.export import export_onnx

    export_onnx(net, path, (3, image_size, image_size))


class _Reader:
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.name, self.batches, self.i = name, batches, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}


def run_ort(model: Path, out: Path, x: np.ndarray, extra: dict | None = None) -> float:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    t = time.perf_counter()
    quantize_static(
        str(model), str(out), _Reader("input", [x[:32], x[32:]]), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        extra_options=extra,
    )
    return time.perf_counter() - t


def run_ours(model: Path, out: Path, calib: Path) -> tuple[float, dict]:
    import laqonnx

    t = time.perf_counter()
    res = laqonnx.quantize(model, out, str(calib), progress=False)
    return time.perf_counter() - t, dict(res.timings)


def lowering_alternatives(model: Path, calib: Path, x: np.ndarray, tmp: Path, runs: int) -> dict:
    """Our lowering (QDQQuantizer + our ranges) vs quantize_static + TensorQuantOverrides, same plan."""
    import laqonnx
    from laqonnx.graph import load_model
    from laqonnx.quant.lower import LoweringSpec, _weight_override, lower
    from laqonnx.quant.numerics import weight_qparams

    res = laqonnx.quantize(model, tmp / "plan_src.onnx", str(calib), progress=False)
    pm = load_model(model)
    plan = res.plan
    qps = {lp.weight: weight_qparams(pm.weight(pm.layer(lp.name)), lp.chosen.weight) for lp in plan.layers}
    spec = LoweringSpec(weights=qps, ranges={r.tensor: (r.rmin, r.rmax) for r in plan.ranges})
    folded = tmp / "folded.onnx"
    onnx.save(pm.model, str(folded))
    direct, static = [], []
    for _ in range(runs):
        t = time.perf_counter()
        lower(pm.model, spec)
        direct.append(time.perf_counter() - t)
        overrides = {w: _weight_override(qp) for w, qp in qps.items()}
        for r in plan.ranges:  # activation ranges as rmin/rmax overrides
            overrides.setdefault(r.tensor, [{"rmin": np.float32(r.rmin), "rmax": np.float32(r.rmax)}])
        static.append(run_ort(folded, tmp / "static.onnx", x, {"TensorQuantOverrides": overrides, "QDQDisableWeightAdjustForInt32Bias": True}))
    a, b = onnx.load(str(tmp / "static.onnx")), lower(pm.model, spec)
    ia = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
    ib = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer}
    same = set(ia) == set(ib) and all(np.array_equal(ia[k], ib[k]) for k in ia)
    return {
        "direct_qdqquantizer_s": statistics.median(direct),
        "quantize_static_with_overrides_s": statistics.median(static),
        "identical_initializers": bool(same),
        "runs": runs,
    }


def scoring_floor(model: Path, x: np.ndarray, runs: int) -> dict:
    """What scoring would cost if every weight-error norm ``||T[W - Q(W)]||`` were free: a lower
    bound for any cheaper estimator of that term (a method change), measured side by side with the
    real scoring on the same calibration statistics. The error norms are replaced by 0 (so every
    int8 ``Lhat`` takes the one-step path, as it does now); everything else runs as in ``quantize``."""
    import laqonnx.lipschitz as lip
    from laqonnx.quant.collect import collect
    from laqonnx.graph import load_model
    from laqonnx.quant.lower import quantized_tensors
    from laqonnx.quant.metric import CandidateSpace, ObjectiveConfig, score_layers

    pm = load_model(model)
    tensors = quantized_tensors(pm.model)
    stats = collect(pm.model, tensors, [x[:32], x[32:]], progress=False)
    config, space = ObjectiveConfig(), CandidateSpace()
    real = lip.operator_norm

    def free_error_norms(layer, weight, **kw):
        if kw.get("tol") == config.error_norm_tol:
            return lip.OperatorNorm(0.0, "lanczos", 0, "", None)
        return real(layer, weight, **kw)

    full, floor = [], []
    try:
        for _ in range(runs):
            for fn, into in ((real, full), (free_error_norms, floor)):
                lip.operator_norm = fn
                t = time.perf_counter()
                score_layers(pm, stats, config, space, weight_bits=(8,), progress=False)
                into.append(time.perf_counter() - t)
    finally:
        lip.operator_norm = real
    return {"score_s": statistics.median(full), "score_without_error_norms_s": statistics.median(floor), "runs": runs}


NARROWER = {  # name -> laqonnx.quantize keyword arguments (the CLI flags in the name)
    "defaults": {},
    "--per-channel": {"per_channel": True},
    "--weight-methods maxabs": {"weight_methods": ("maxabs",)},
    "--per-channel --weight-methods maxabs": {"per_channel": True, "weight_methods": ("maxabs",)},
}


def narrower_searches(model: Path, calib: Path, tmp: Path, runs: int) -> dict:
    """``laqonnx.quantize`` time with narrower candidate sets (the CLI's --per-channel and
    --weight-methods), the settings alternating in one process; medians."""
    import laqonnx
    from laqonnx.quant.metric import CandidateSpace

    times: dict[str, list[float]] = {k: [] for k in NARROWER}
    for _ in range(runs):
        for name, kw in NARROWER.items():
            kw = dict(kw)
            methods = kw.pop("weight_methods", None)
            space = CandidateSpace(weight_methods=methods) if methods else None
            t = time.perf_counter()
            laqonnx.quantize(model, tmp / "narrow.onnx", str(calib), progress=False, candidates=space, **kw)
            times[name].append(time.perf_counter() - t)
    return {"median_s": {k: statistics.median(v) for k, v in times.items()}, "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="112x112, width 32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--narrower", action="store_true", help="also time the narrower candidate sets (--per-channel, --weight-methods maxabs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantize_time.json"), help="result JSON")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    size, width = (112, 32) if args.quick else (224, 64)
    runs = max(3, args.runs)
    net, source = _resnet18(width, size)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (64, 3, size, size)).astype(np.float32)
    result: dict = {
        "command": "python benchmarks/quantize_time.py" + (" --quick" if args.quick else "") + f" --runs {runs}"
                   + (" --narrower" if args.narrower else ""),
        "model": f"{source}(width={width}) at 3x{size}x{size}, random weights",
        "calibration": "64 uniform-random images in [0,1], batches of 32",
        "ort": "quantize_static QDQ, QUInt8 activations, QInt8 per-channel weights, MinMax",
        "ours": "laqonnx.quantize defaults (objective laq, eps 8/255 Linf, int8, per-tensor+per-channel x maxabs/mse/percentile weight "
                "candidates, minmax/percentile/entropy/mse activation ranges, norm_max_spatial=32, Lanczos tol 1e-3, error-norm tol 1e-2, "
                "int8 Lhat by one application on the float top vector)",
        "git_commit": _git_commit(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
        "note": "2-core machine; other jobs show in load_avg_start/end. The tools alternate in one process (the first run of "
                "ours also pays the torch import); compare the medians of this run, not runs on different days",
    }
    with tempfile.TemporaryDirectory(prefix="laqonnx-bench-") as tmpdir:
        tmp = Path(tmpdir)
        model = tmp / "resnet18.onnx"
        _export(net, size, model)
        calib = tmp / "calib.npz"
        np.savez(calib, x=x)
        ours, theirs, stages = [], [], []
        for i in range(runs):
            for who in (("ours", "ort") if i % 2 == 0 else ("ort", "ours")):
                if who == "ours":
                    t, st = run_ours(model, tmp / f"ours{i}.onnx", calib)
                    ours.append(t)
                    stages.append(st)
                else:
                    theirs.append(run_ort(model, tmp / f"ort{i}.onnx", x))
                print(f"run {i} {who}: {(ours if who == 'ours' else theirs)[-1]:.2f} s", flush=True)
        result["ours_s"] = ours
        result["ort_s"] = theirs
        result["ours_median_s"] = statistics.median(ours)
        result["ort_median_s"] = statistics.median(theirs)
        result["ratio"] = result["ours_median_s"] / result["ort_median_s"]
        result["target_ratio"] = 1.5
        result["ours_stage_median_s"] = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
        result["lowering_alternatives"] = lowering_alternatives(model, calib, x, tmp, runs)
        floor = scoring_floor(model, x, runs)
        st = result["ours_stage_median_s"]
        # the error norms' cost as measured side by side, taken off our median total
        floor["total_floor_s"] = st["total"] - (floor["score_s"] - floor["score_without_error_norms_s"])
        floor["ratio_floor"] = floor["total_floor_s"] / result["ort_median_s"]
        result["scoring_floor"] = floor
        if args.narrower:
            result["narrower_searches"] = narrower_searches(model, calib, tmp, runs)
        result["machine"]["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ours_median_s", "ort_median_s", "ratio", "ours_stage_median_s", "lowering_alternatives",
                                                 "scoring_floor", "narrower_searches") if k in result}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
