"""Peak memory of laqonnx.quant.collect.collect() with N vs 10N calibration samples (streaming check).

Each measurement runs in a fresh subprocess: a conv model (3x32x32 input, two convs of 16 and 32
channels) is calibrated on every activation, with input batches generated on the fly so that the
only thing growing with N is the number of batches ``collect`` consumes. Reported per run: peak
RSS (``resource.getrusage``, includes onnxruntime's arena) and the tracemalloc peak (Python and
numpy allocations). Repeated runs, medians, and the 10N / N ratio, which must be <= 1.2.

    python benchmarks/calibration_memory.py [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "calibration_memory.json"
TARGET_RATIO = 1.2

CHILD = r"""
import json, resource, sys, time, tracemalloc
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from laqonnx.quant.collect import collect

n, batch, bins = (int(a) for a in sys.argv[1:4])
rng = np.random.default_rng(0)
init = lambda name, shape, s: numpy_helper.from_array(rng.normal(0, s, shape).astype(np.float32), name)
nodes = [
    helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
    helper.make_node("Relu", ["c1"], ["r1"]),
    helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
    helper.make_node("Relu", ["c2"], ["r2"]),
    helper.make_node("Flatten", ["r2"], ["f"], axis=1),
    helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
]
inits = [init("w1", (16, 3, 3, 3), 0.3), init("b1", (16,), 0.1), init("w2", (32, 16, 3, 3), 0.1),
         init("b2", (32,), 0.1), init("w3", (10, 32 * 16 * 16), 0.01), init("b3", (10,), 0.1)]
graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
names = ["input", "c1", "r1", "c2", "r2", "f", "logits"]

def batches():
    gen = np.random.default_rng(1)
    for start in range(0, n, batch):
        yield gen.uniform(0, 1, (min(batch, n - start), 3, 32, 32)).astype(np.float32)

tracemalloc.start()
t0 = time.perf_counter()
stats = collect(model, names, batches(), bins=bins, progress=False)
seconds = time.perf_counter() - t0
_, peak = tracemalloc.get_traced_memory()
rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert all(s.n_examples == n for s in stats.values())
print(json.dumps({"n": n, "seconds": seconds, "tracemalloc_peak_mb": peak / 2**20, "peak_rss_mb": rss_kb / 1024}))
"""


def run_child(n: int, batch: int, bins: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n), str(batch), str(bins)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 64 instead of 256 (and 2 repeats)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per configuration (default 3, quick 2)")
    parser.add_argument("--batch", type=int, default=32, help="calibration batch size")
    parser.add_argument("--bins", type=int, default=2048, help="histogram bins")
    args = parser.parse_args(argv)
    n = 64 if args.quick else 256
    repeats = args.repeats or (2 if args.quick else 3)
    runs: dict[str, list[dict]] = {"N": [], "10N": []}
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        for key, count in (("N", n), ("10N", 10 * n)):
            runs[key].append(run_child(count, args.batch, args.bins))
            print(f"{key:>3} n={count:5d}  {runs[key][-1]}", file=sys.stderr)
    med = {
        key: {m: statistics.median(r[m] for r in rs) for m in ("seconds", "tracemalloc_peak_mb", "peak_rss_mb")}
        for key, rs in runs.items()
    }
    ratio = {m: med["10N"][m] / med["N"][m] for m in ("tracemalloc_peak_mb", "peak_rss_mb")}
    result = {
        "benchmark": "calibration_memory",
        "command": "python benchmarks/calibration_memory.py" + (" --quick" if args.quick else ""),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, shared by several engineers (noisy timings)",
        "model": "Conv16-Relu-Conv32(s2)-Relu-Flatten-Gemm, input 3x32x32, 7 tensors calibrated",
        "n": n, "batch": args.batch, "bins": args.bins, "repeats": repeats,
        "runs": runs, "median": med, "ratio_10N_over_N": ratio,
        "target_ratio": TARGET_RATIO,
        "streaming_ok": all(r <= TARGET_RATIO for r in ratio.values()),
    }
    sys.path.insert(0, str(ROOT))
    from laqonnx._util.io import atomic_write_json

    atomic_write_json(RESULT, result)
    print(
        f"collect() peak memory, N={n} vs 10N={10 * n} (medians of {repeats}): "
        f"RSS {med['N']['peak_rss_mb']:.1f} -> {med['10N']['peak_rss_mb']:.1f} MB (x{ratio['peak_rss_mb']:.3f}), "
        f"tracemalloc {med['N']['tracemalloc_peak_mb']:.1f} -> {med['10N']['tracemalloc_peak_mb']:.1f} MB "
        f"(x{ratio['tracemalloc_peak_mb']:.3f}); time {med['N']['seconds']:.2f} s -> {med['10N']['seconds']:.2f} s; "
        f"target <= {TARGET_RATIO}: {'OK' if result['streaming_ok'] else 'FAILED'}  -> {RESULT.relative_to(ROOT)}"
    )
    return 0 if result["streaming_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
