"""Benchmark: ResNet-18 at 3x224x224, float vs onnxruntime int8 QDQ (per-channel), CPU latency.

    python benchmarks/latency_resnet.py [--quick] [--naive] [--threads 2] [--runs 200] [--repeats 3]

The ResNet-18 is defined here (torchvision is not usable on this machine), randomly initialised
(latency does not depend on the weights' values), exported with ``torch.onnx.export(dynamo=False)``
and quantized with ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights,
uint8 activations, a few random calibration images). Both models are measured with
``laqonnx.latency.compare_latency`` interleaved at batch 1, ``repeats`` times; the summary is the
median over repeats of each model's p50 and of the per-repeat ratio float / int8. ``--naive``
adds, in the same interleaved comparison, an int8 model whose conv biases stay float (so
onnxruntime cannot fuse those convs into int8 kernels), to show what that costs. Writes
``benchmarks/results/latency_resnet.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from laqonnx._util.io import atomic_write_json  # noqa: E402
from laqonnx.latency import compare_latency, cpu_info  # noqa: E402


def resnet18(num_classes: int = 1000, trained_bn: bool = True):
    import torch
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    torch.manual_seed(0)
    net = nn.Sequential(*layers)
    with torch.no_grad():  # trained-looking BatchNorm statistics, so folded conv biases are all distinct
        for m in net.modules():
            if trained_bn and isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def export(path: Path, trained_bn: bool = True) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter is what we want
    torch.onnx.export(resnet18(trained_bn=trained_bn), torch.zeros(1, 3, 224, 224), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})


def quantize(src: Path, dst: Path, n_calib: int, preprocess: bool = True) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.uniform(0, 1, (1, 3, 224, 224)).astype(np.float32)} for _ in range(n_calib)])

        def get_next(self):
            return next(self.batches, None)

    pre = dst.with_name(dst.stem + ".pre.onnx")
    if preprocess:
        quant_pre_process(str(src), str(pre))  # shape inference and graph clean-up, as onnxruntime recommends
    else:
        pre = src
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def optimized_ops(path: Path) -> dict[str, int]:
    """Op counts of the graph onnxruntime actually runs (after ORT_ENABLE_ALL fusions)."""
    import collections

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return dict(collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few runs, one repeat (a smoke test, not a figure)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200, help="timed runs per model per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved comparisons; medians are over these")
    ap.add_argument("--naive", action="store_true",
                    help="also measure int8 quantized the naive way: freshly initialised BatchNorm (zero folded biases, "
                         "which the exporter shares through Identity nodes) and no quant_pre_process, so those conv "
                         "biases stay float and onnxruntime does not fuse the convs into int8 kernels")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latency_resnet.json")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer logs advice on the root logger
    runs, repeats, n_calib = (20, 1, 2) if args.quick else (args.runs, args.repeats, 8)

    with tempfile.TemporaryDirectory() as tmp:
        fp, q8 = Path(tmp) / "resnet18.onnx", Path(tmp) / "resnet18.int8.onnx"
        t0 = time.perf_counter()
        export(fp)
        quantize(fp, q8, n_calib)
        print(f"exported and quantized in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        sizes = {"float": fp.stat().st_size, "int8": q8.stat().st_size}
        models = {"float": fp, "int8": q8}
        if args.naive:
            fp0, naive = Path(tmp) / "resnet18.zero_bias.onnx", Path(tmp) / "resnet18.naive.int8.onnx"
            export(fp0, trained_bn=False)
            quantize(fp0, naive, n_calib, preprocess=False)
            models["int8_naive"] = naive
            sizes["int8_naive"] = naive.stat().st_size
        ops = {name: optimized_ops(path) for name, path in models.items()}
        per_repeat = []
        load_before = os.getloadavg()
        for i in range(repeats):
            res = compare_latency(models, batch_sizes=(1,), threads=args.threads,
                                  warmup=20, runs=runs, rounds=max(1, runs // 10), progress=True)
            row = {k: r.at(1).p50_ms for k, r in res.items()}
            row["ratio_float_over_int8"] = row["float"] / row["int8"]
            if args.naive:
                row["ratio_float_over_int8_naive"] = row["float"] / row["int8_naive"]
            row["p90"] = {k: r.at(1).p90_ms for k, r in res.items()}
            per_repeat.append(row)
            print(f"repeat {i + 1}/{repeats}: float {row['float']:.2f} ms, int8 {row['int8']:.2f} ms, "
                  f"ratio {row['ratio_float_over_int8']:.2f}", file=sys.stderr)

    load_after = os.getloadavg()
    info = cpu_info()
    summary = {
        "float_p50_ms": statistics.median(r["float"] for r in per_repeat),
        "int8_p50_ms": statistics.median(r["int8"] for r in per_repeat),
        "ratio_float_over_int8": statistics.median(r["ratio_float_over_int8"] for r in per_repeat),
    }
    if args.naive:
        summary["int8_naive_p50_ms"] = statistics.median(r["int8_naive"] for r in per_repeat)
        summary["ratio_float_over_int8_naive"] = statistics.median(r["ratio_float_over_int8_naive"] for r in per_repeat)
    import onnxruntime
    import torch

    out = {
        "benchmark": "ResNet-18 3x224x224, float vs onnxruntime int8 QDQ per-channel (U8S8), batch 1",
        "command": "python benchmarks/latency_resnet.py" + (" --quick" if args.quick else "")
        + (" --naive" if args.naive else "") + f" --threads {args.threads} --runs {runs} --repeats {repeats}",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "summary": summary,
        "per_repeat": per_repeat,
        "size_bytes": sizes,
        "optimized_op_counts": ops,
        "settings": {"threads": args.threads, "batch_size": 1, "warmup": 20, "runs": runs, "repeats": repeats,
                     "interleaved_rounds": max(1, runs // 10), "calibration_images": n_calib},
        "machine": {"cpu_model": info.model_name, "logical_cores": info.logical_cores, "int8_isa": info.int8_isa(),
                    "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                    "load_average_1_5_15min": {"before": [round(v, 2) for v in load_before],
                                               "after": [round(v, 2) for v in load_after]},
                    "note": "shared machine (2 cores, several other engineers running jobs): noisy"},
        "reference": "DESIGN.md section 5, quiet machine: float 8.2 ms, int8 5.8 ms (ratio 1.41)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)
    print(f"float {summary['float_p50_ms']:.2f} ms | int8 {summary['int8_p50_ms']:.2f} ms | "
          f"float/int8 {summary['ratio_float_over_int8']:.2f}x (median of {repeats}; {args.threads} threads) -> {args.out}")
    if args.naive:
        print(f"naive int8 (float conv biases, unfused) {summary['int8_naive_p50_ms']:.2f} ms | "
              f"float/naive int8 {summary['ratio_float_over_int8_naive']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
