"""End-to-end `laqonnx.quantize` time vs onnxruntime's entropy-calibrated `quantize_static`.

Issue 12's targets, on the ResNet-18 at 3x224x224 (random weights, BatchNorm folded by both tools)
and the same 64 calibration images (uniform-random in [0, 1], batches of 32), measured side by side
(the tools alternate, each run in a fresh output file, >= 3 runs each, medians and their ratios):

- laqonnx default int8 *without* adversarial calibration (``adversarial_calib=False``) <= onnxruntime
  ``quantize_static`` with ``CalibrationMethod.Entropy`` (ratio <= 1);
- laqonnx default int8 *with* adversarial calibration (the default when eps > 0) <= 60 s.

onnxruntime MinMax is timed too, for scale. Also recorded: our per-stage timings (median).

    python benchmarks/quantize_time.py            # full: 224x224, 3 runs each
    python benchmarks/quantize_time.py --quick    # 112x112, width 32, 3 runs each

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


def run_ort(model: Path, out: Path, x: np.ndarray, method: str) -> float:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    t = time.perf_counter()
    quantize_static(
        str(model), str(out), _Reader("input", [x[:32], x[32:]]), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
    )
    return time.perf_counter() - t


def run_ours(model: Path, out: Path, calib: Path, adversarial: bool, metric_examples: int = 64) -> tuple[float, dict]:
    import laqonnx

    t = time.perf_counter()
    res = laqonnx.quantize(model, out, str(calib), adversarial_calib=None if adversarial else False, progress=False,
                           metric_examples=metric_examples)
    return time.perf_counter() - t, dict(res.timings)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="112x112, width 32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--metric-examples", type=int, default=None, metavar="N",
                    help="also time the default int8 without adversarial calibration with --metric-examples N (the metric's "
                         "terms on N of the 64 images), side by side")
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
                   + (f" --metric-examples {args.metric_examples}" if args.metric_examples else ""),
        "model": f"{source}(width={width}) at 3x{size}x{size}, random weights",
        "calibration": "64 uniform-random images in [0,1], batches of 32",
        "ort": "quantize_static QDQ, QUInt8 activations, QInt8 per-channel weights; Entropy (the target) and MinMax",
        "ours": "laqonnx.quantize defaults (objective laq, eps 8/255 L-inf, int8, guard on), without and with "
                "adversarial calibration",
        "targets": {"no_adv_over_ort_entropy": 1.0, "with_adv_s": 60.0},
        "git_commit": _git_commit(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
        "note": "2-core machine; other jobs show in load_avg_start/end. The tools alternate in one process (the first run "
                "of ours also pays the torch import); compare the medians of this run, not runs on different days",
    }
    few = f"ours_me{args.metric_examples}" if args.metric_examples else None
    kinds = ("ours", "ours_adv", *((few,) if few else ()), "ort_entropy", "ort_minmax")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    stages: dict[str, list[dict]] = {k: [] for k in kinds if k.startswith("ours")}
    with tempfile.TemporaryDirectory(prefix="laqonnx-bench-") as tmpdir:
        tmp = Path(tmpdir)
        model = tmp / "resnet18.onnx"
        _export(net, size, model)
        calib = tmp / "calib.npz"
        np.savez(calib, x=x)
        for i in range(runs):
            order = kinds if i % 2 == 0 else kinds[::-1]
            for who in order:
                out = tmp / f"{who}{i}.onnx"
                if who.startswith("ours"):
                    t, st = run_ours(model, out, calib, adversarial=who == "ours_adv",
                                     metric_examples=args.metric_examples if who == few else 64)
                    stages[who].append(st)
                else:
                    t = run_ort(model, out, x, "Entropy" if who == "ort_entropy" else "MinMax")
                times[who].append(t)
                print(f"run {i} {who}: {t:.2f} s", flush=True)
        result["seconds"] = times
        med = {k: statistics.median(v) for k, v in times.items()}
        result["median_s"] = med
        result["no_adv_over_ort_entropy"] = med["ours"] / med["ort_entropy"]
        result["no_adv_over_ort_minmax"] = med["ours"] / med["ort_minmax"]
        if few:
            result[f"{few}_over_ort_entropy"] = med[few] / med["ort_entropy"]
            result["note_metric_examples"] = (f"{few}: the default int8 without adversarial calibration, the metric's terms "
                                              f"and the guard on {args.metric_examples} of the 64 images (ranges from all 64)")
        result["met"] = {"no_adv_vs_entropy": result["no_adv_over_ort_entropy"] <= 1.0, "with_adv_60s": med["ours_adv"] <= 60.0}
        result["stage_median_s"] = {w: {k: statistics.median(s.get(k, 0.0) for s in st) for k in st[0]}
                                    for w, st in stages.items()}
        result["machine"]["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "no_adv_over_ort_entropy", "met", "stage_median_s")}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
