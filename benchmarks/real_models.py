"""Every real model of ``../shared/real-models``: analyze and quantize time, int8 and budget agreement, latency.

For each model (MANIFEST.txt: exported by others, opsets 9-20, batch 1, NHWC, [-1, 1] inputs, two
outputs, unfolded BatchNorm), on real MNIST in the model's own units (the ResNet-20, for which no
CIFAR data is here, on clipped normal noise of CIFAR's normalised shape; agreement only):

- ``laqonnx.analyze`` time and the network bound it reports;
- ``laqonnx.quantize`` default int8 (adversarial calibration at eps = 0.1 x the input range) time,
  top-1 agreement with float and accuracy on the 1000 test digits, and the same for onnxruntime's
  ``quantize_static`` (MinMax, per-channel) run on laqonnx's intake copy (the original files are
  refused by it or give unloadable models for 5 of the 6), timed alone;
- issue 12's agreement goal under a budget: LAQ vs the ``mse`` ablation at 6 and 5 average weight
  bits (agreement with float on the test digits);
- batch-1 latency, float vs laqonnx int8, interleaved (``compare_latency``, 1 thread).

    python benchmarks/real_models.py [--quick]      # --quick: two models, no budgets

Writes benchmarks/results/real_models.json and a Markdown table (benchmarks/results/real_models.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "real-models"
MODELS = {  # name -> (input range, classifier output, dataset)
    "andrey_mnist": ((0.0, 1.0), None, "mnist"),
    "sightvanish_mnist": ((0.0, 1.0), None, "mnist"),
    "onjackay_mnist": ((0.0, 1.0), "output", "mnist"),
    "zuramai_mnist": ((-1.0, 1.0), None, "mnist"),
    "wuhan_mnist-lg": ((0.0, 1.0), None, "mnist"),
    "onnc_resnet20": ((-3.0, 3.0), None, "noise"),
}


def _predict(path, x: np.ndarray) -> np.ndarray:
    from laqonnx.graph.session import open_session, run_batched

    s = open_session(path, threads=1)
    i, o = s.get_inputs()[0], s.get_outputs()[0]
    fixed = i.shape[0] if isinstance(i.shape[0], int) else None
    return run_batched(s, i.name, x, [o.name], fixed, batch_size=256)[0].argmax(axis=1)


def _data(name: str, rng_: tuple[float, float], kind: str, input_shape) -> tuple:
    from laqonnx.data import open_data

    if kind == "noise":
        g = np.random.default_rng(0)
        x = np.clip(g.normal(0, 1, (640, 3, 32, 32)), -3, 3).astype(np.float32)
        return (x[:256], None), x[256:], None
    test = open_data("mnist:test", input_shape=input_shape, input_range=rng_)
    x, y = next(test.batches(len(test)))
    return "mnist", x, y


def run_one(name: str, budgets: tuple[float, ...], tmp: Path, latency_runs: int) -> dict:
    import laqonnx
    from laqonnx.graph import load_model
    from laqonnx.latency import compare_latency
    from laqonnx.quant.lower import ort_baseline

    rng_, output, kind = MODELS[name]
    path = REAL / f"{name}.onnx"
    pm = load_model(path, output=output)
    calib, x, y = _data(name, rng_, kind, pm.input_shape)
    eps = 0.1 * (rng_[1] - rng_[0])
    row: dict = {"model": name, "opset": pm.source_opset, "input_shape": list(pm.input_shape), "input_range": rng_,
                 "eps": eps, "n_test": int(len(x))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        a = laqonnx.analyze(path)
        row["analyze_s"] = time.perf_counter() - t
        row["network_bound"] = a.network_bound
        kw = dict(eps=eps, input_range=rng_, output_name=output, calib_limit=256, progress=False)
        out = tmp / f"{name}.int8.onnx"
        t = time.perf_counter()
        res = laqonnx.quantize(path, out, calib, **kw)
        row["quantize_s"] = time.perf_counter() - t
        row["guard_kept"] = res.plan.guard.kept if res.plan.guard is not None else None
        # onnxruntime's quantize_static on our intake copy, with the same calibration examples
        from laqonnx.data import open_data

        cx = calib[0] if isinstance(calib, tuple) else next(open_data(calib, input_shape=pm.input_shape,
                                                                        input_range=rng_, limit=256).batches(256))[0]
        batches = [cx[i:i + (pm.fixed_batch or 32)] for i in range(0, len(cx), pm.fixed_batch or 32)]
        t = time.perf_counter()
        base = ort_baseline(pm.model, pm.input_name, batches, method="ort-minmax", per_channel=True)
        row["ort_quantize_s"] = time.perf_counter() - t
        base_path = tmp / f"{name}.ort.onnx"
        import onnx

        onnx.save(base, str(base_path))
        fp, qp, op = _predict(path, x), _predict(out, x), _predict(base_path, x)
        row["agreement"] = float(np.mean(fp == qp))
        row["ort_agreement"] = float(np.mean(fp == op))
        if y is not None:
            row["float_accuracy"], row["accuracy"], row["ort_accuracy"] = (float(np.mean(p == y)) for p in (fp, qp, op))
        for bits in budgets:
            for objective in ("laq", "mse"):
                o2 = tmp / f"{name}.{objective}{bits:g}.onnx"
                r2 = laqonnx.quantize(path, o2, calib, avg_weight_bits=bits, objective=objective,
                                      guard=objective == "laq", **kw)
                row[f"{objective}_{bits:g}_agreement"] = float(np.mean(fp == _predict(o2, x)))
                row[f"{objective}_{bits:g}_bits"] = r2.avg_weight_bits
    lat = compare_latency({"float": path, "int8": out}, batch_sizes=(1,), threads=1, runs=latency_runs, warmup=10,
                          rounds=10)
    row["p50_ms"] = {k: v.at(1).p50_ms for k, v in lat.items()}
    row["int8_over_float"] = row["p50_ms"]["int8"] / row["p50_ms"]["float"]
    return row


def _md(rows: list[dict], budgets: tuple[float, ...], command: str) -> str:
    def p(v):
        return "—" if v is None else f"{100 * v:.1f}"

    head = ["model", "opset", "analyze s", "quantize s", "ORT s", "agree %", "ORT agree %", "acc % (float)", "ORT acc %",
            *(f"{o} @{b:g} agree %" for b in budgets for o in ("laq", "mse")), "p50 float ms", "p50 int8 ms", "int8/float"]
    L = [f"Command: `{command}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            L.append(f"| {r['model']} | failed: {r['error']} |")
            continue
        cells = [r["model"], str(r["opset"]), f"{r['analyze_s']:.2f}", f"{r['quantize_s']:.1f}", f"{r['ort_quantize_s']:.1f}",
                 p(r["agreement"]), p(r["ort_agreement"]),
                 f"{p(r.get('accuracy'))} ({p(r.get('float_accuracy'))})", p(r.get("ort_accuracy")),
                 *(p(r.get(f"{o}_{b:g}_agreement")) for b in budgets for o in ("laq", "mse")),
                 f"{r['p50_ms']['float']:.3f}", f"{r['p50_ms']['int8']:.3f}", f"{r['int8_over_float']:.2f}"]
        L.append("| " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two models, no budgets, few latency runs")
    ap.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--budgets", default="6,5", help="average weight bits for the LAQ-vs-mse agreement goal (default 6,5)")
    ap.add_argument("--latency-runs", type=int, default=300)
    args = ap.parse_args()
    if not REAL.is_dir():
        print(f"no real models at {REAL}", file=sys.stderr)
        return 2
    names = args.models.split(",") if args.models else (["andrey_mnist", "zuramai_mnist"] if args.quick else list(MODELS))
    budgets = () if args.quick else tuple(float(b) for b in args.budgets.split(",") if b)
    command = "python benchmarks/real_models.py " + " ".join(sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory(prefix="laqonnx-real-") as tmp:
        for n in names:
            t = time.perf_counter()
            try:
                rows.append(run_one(n, budgets, Path(tmp), 30 if args.quick else args.latency_runs))
            except Exception as exc:  # a benchmark records a failure instead of stopping
                rows.append({"model": n, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
            print(f"{n}: {time.perf_counter() - t:.0f}s {json.dumps(rows[-1])}", flush=True)
    ok = [r for r in rows if "error" not in r]
    goal = {}
    for b in budgets:
        ks = [(r[f"laq_{b:g}_agreement"], r[f"mse_{b:g}_agreement"]) for r in ok]
        goal[f"{b:g}"] = {"laq_ge_mse_minus_1pt": all(laq >= mse - 0.01 for laq, mse in ks),
                          "laq_ge_0.95_where_mse_does": all(laq >= 0.95 for laq, mse in ks if mse >= 0.95)}
    result = {"command": command, "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                               "load_avg": os.getloadavg()},
              "rows": rows, "agreement_goal": goal,
              "median_int8_over_float": statistics.median(r["int8_over_float"] for r in ok) if ok else None}
    out = ROOT / "benchmarks" / "results" / ("real_models_quick.json" if args.quick else "real_models.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_md(rows, budgets, command))
    print(_md(rows, budgets, command))
    print(json.dumps(goal, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
