"""Evaluation throughput of ``laqonnx.evaluate``: examples per second per preset, float vs int8.

The model is the demo's PGD-trained digits CNN (``laqonnx.zoo.get_model("cnn", "pgd")``, 16x16
digits) when the zoo provides it, else a small CNN trained here on 8x8 digits for a few seconds.
Its int8 QDQ version is made with onnxruntime's ``quantize_static`` (per-channel). Each preset is
run ``--repeats`` times per model, interleaved (float, int8, float, int8, ...), on the first N
test examples at L-inf eps = 0.1, without latency measurement or sweep; the figure is
``N / wall seconds`` of the whole ``evaluate`` call (ORT session + mirror build + all attacks).
Medians are reported with the per-attack seconds. The machine is shared: timings are noisy.

    python benchmarks/evaluate_throughput.py [--quick] [--presets quick standard] [--repeats 3] [--n 200]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "evaluate_throughput.json"
EPS = 0.1


def _demo_model(workdir: Path) -> tuple[Path, str]:
    """(float model path, description): the zoo's PGD-trained CNN, else a small CNN trained here."""
    try:
        from laqonnx.zoo import get_model

        zm = get_model("cnn", "pgd", progress=False)
        return Path(zm.path), f"laqonnx.zoo get_model('cnn', 'pgd'): {zm.config}"
    except (ImportError, AttributeError) as exc:
        print(f"zoo model unavailable ({exc}); training a small CNN", file=sys.stderr)
    import io

    import onnx
    import torch

    from laqonnx.zoo.digits import load_digits

    torch.manual_seed(0)
    x, y = (torch.from_numpy(a) for a in load_digits(8, "train"))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(10):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    buf = io.BytesIO()
    torch.onnx.export(net.eval(), torch.zeros(1, 1, 8, 8), buf, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    path = workdir / "cnn.onnx"
    onnx.save(onnx.load_from_string(buf.getvalue()), path)
    return path, "small CNN (conv8-conv16/s2-linear) trained here for 10 epochs on 8x8 digits (plain training)"


def _int8(path: Path, workdir: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from laqonnx.data import open_data
    from laqonnx.robustness.ort_estimator import OrtModel, load_model

    shape = OrtModel(load_model(path)).declared_shape
    calib = next(open_data("digits", input_shape=(None, *shape), split="train").batches(128))[0]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.it, None)

    out = workdir / "cnn.int8.onnx"
    quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick preset only, N=100, 2 repeats")
    parser.add_argument("--presets", nargs="+", default=None, choices=("quick", "standard", "thorough"))
    parser.add_argument("--repeats", type=int, default=None, help="runs per preset and model (default 3, quick 2)")
    parser.add_argument("--n", type=int, default=None, help="test examples (default 200, quick 100)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from laqonnx._util.io import atomic_write_json
    from laqonnx.robustness.evaluate import evaluate

    presets = args.presets or (["quick"] if args.quick else ["quick", "standard"])
    repeats = args.repeats or (2 if args.quick else 3)
    n = args.n or (100 if args.quick else 200)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        float_path, description = _demo_model(work)
        models = {"float": float_path, "int8": _int8(float_path, work)}
        runs: dict[str, dict[str, list[dict]]] = {p: {k: [] for k in models} for p in presets}
        for preset in presets:
            for rep in range(repeats if preset != "thorough" else 1):
                for key, path in models.items():  # interleaved: machine noise hits both alike
                    t0 = time.perf_counter()
                    report = evaluate(path, "digits", EPS, preset=preset, reference=float_path, limit=n,
                                      latency=False, sweep=False, progress=False)
                    seconds = time.perf_counter() - t0
                    m = report.models[0]
                    runs[preset][key].append({"seconds": seconds, "examples_per_second": m.n_examples / seconds,
                                              "attack_seconds": dict(m.attack_seconds),
                                              "robust_accuracy": dict(m.robust_accuracy),
                                              "clean_accuracy": m.clean_accuracy})
                    print(f"{preset:9s} {key:5s} run {rep + 1}: {seconds:6.1f} s, {m.n_examples / seconds:6.1f} ex/s, "
                          f"worst case {m.robust_accuracy['worst_case']:.3f}", file=sys.stderr)
    median = {
        p: {k: {"seconds": statistics.median(r["seconds"] for r in rs),
                "examples_per_second": statistics.median(r["examples_per_second"] for r in rs),
                "attack_seconds": {a: statistics.median(r["attack_seconds"][a] for r in rs)
                                   for a in rs[0]["attack_seconds"]}}
            for k, rs in by_model.items()}
        for p, by_model in runs.items()
    }
    command = "python benchmarks/evaluate_throughput.py" + (" --quick" if args.quick else "")
    if args.presets:
        command += " --presets " + " ".join(args.presets)
    result = {
        "benchmark": "evaluate_throughput",
        "command": command,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, 2 cores shared by several engineers (noisy)",
        "model": description, "eps": EPS, "norm": "inf", "n_examples": n, "repeats": repeats,
        "runs": runs, "median": median,
        "int8_over_float_seconds": {p: median[p]["int8"]["seconds"] / median[p]["float"]["seconds"] for p in presets},
    }
    atomic_write_json(RESULT, result)
    for p in presets:
        f, q = median[p]["float"], median[p]["int8"]
        print(f"{p:9s}: float {f['examples_per_second']:6.1f} ex/s ({f['seconds']:.1f} s), int8 "
              f"{q['examples_per_second']:6.1f} ex/s ({q['seconds']:.1f} s) for {n} examples; medians of runs")
    print(f"-> {RESULT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
