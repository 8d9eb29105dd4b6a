"""Adaptive rounding's cost on the ResNet-18 at 3x224x224 (issue 17: "ResNet-18 224^2 in minutes").

Two measurements, one process:

1. ``--layers``: one adaptive-rounding fit (int4 per-channel MSE scale, the default
   ``AdaRoundConfig``) on four of the model's layer shapes (conv1 7x7/2 at 224, a layer1 3x3 at 56,
   a layer3 3x3 at 14, a layer4 3x3 at 7; 128 input rows: 64 clean + 64 adversarial, as the metric
   fits them), through the input Gram matrix and through minibatches, side by side: wall time,
   steps and the reconstruction error each reaches.
2. ``quantize``: ``laqonnx.quantize(model, avg_weight_bits=4)`` with the defaults (``rounding``
   auto: an adaptive candidate per int4 per-channel MSE setting, the chosen ones re-fitted in
   order; adversarial calibration at eps 8/255), 64 uniform-random images: total and per-stage
   time, the time spent in adaptive rounding (every fit, scoring and re-fit), which path each fit
   took, and the errors. ``--runs`` repeats it (median).

    python benchmarks/adaround_resnet18.py            # both, 224x224
    python benchmarks/adaround_resnet18.py --quick    # 112x112, width 32, the quantize run only

Writes benchmarks/results/adaround_resnet18.json.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantize_time import _export, _git_commit, _resnet18  # noqa: E402

LAYERS = {  # name: (c_in, c_out, kernel, stride, pad, input size)
    "conv1 7x7/2 3->64 @224": (3, 64, 7, 2, 3, 224),
    "layer1 3x3 64->64 @56": (64, 64, 3, 1, 1, 56),
    "layer3 3x3 256->256 @14": (256, 256, 3, 1, 1, 14),
    "layer4 3x3 512->512 @7": (512, 512, 3, 1, 1, 7),
}


def _layer(c_in, c_out, k, s, p, size):
    from laqonnx.graph.model import Layer

    return Layer(name="conv", op_type="Conv", weight="w", weight_shape=(c_out, c_in, k, k), bias=None, input="x",
                 output="y", input_shape=(1, c_in, size, size), output_shape=None,
                 attrs={"kernel_shape": (k, k), "strides": (s, s), "dilations": (1, 1), "pads": (p, p, p, p), "group": 1},
                 channel_axis=0, index=0)


def layer_fits(rows: int) -> list[dict]:
    from laqonnx.quant.numerics import PerChannel, WeightQuant, weight_qparams
    from laqonnx.quant.rounding import AdaRoundConfig, adaptive_round
    from laqonnx.quant.rounding_gram import use_gram

    out = []
    for name, geo in LAYERS.items():
        layer = _layer(*geo)
        rng = np.random.default_rng(0)
        w = rng.normal(0, (2 / (geo[0] * geo[2] ** 2)) ** 0.5, layer.weight_shape).astype(np.float32)
        a = np.maximum(rng.normal(0, 1, (rows, geo[0], geo[5], geo[5])), 0).astype(np.float32)
        qp = weight_qparams(w, WeightQuant(4, PerChannel(0), "mse"))
        row = {"layer": name, "default_path": "gram" if use_gram(None, layer, a.shape, 400, 32) else "minibatch"}
        for path in ("gram", "minibatch"):
            t = time.perf_counter()
            r = adaptive_round(layer, w, qp, a, AdaRoundConfig(gram=path == "gram"))
            row[path] = {"seconds": time.perf_counter() - t, "steps": r.steps, "error_nearest": r.error_nearest,
                         "error_adaptive": r.error_adaptive}
            print(f"{name:26s} {path:9s} {row[path]['seconds']:7.1f} s  {r.steps:3d} steps  error {r.error_nearest:.5g} -> "
                  f"{r.error_adaptive:.5g}", flush=True)
        row["speedup"] = row["minibatch"]["seconds"] / row["gram"]["seconds"]
        out.append(row)
    return out


def quantize_run(model: Path, out: Path, calib: Path) -> dict:
    import laqonnx
    import laqonnx.quant.refit as refit_mod
    import laqonnx.quant.rounding as rounding_mod

    fits: list[dict] = []
    original = rounding_mod.adaptive_round

    def timed(layer, w, qp, activations, config=rounding_mod.AdaRoundConfig(), **kw):
        t = time.perf_counter()
        r = original(layer, w, qp, activations, config, **kw)
        fits.append({"layer": layer.name, "seconds": time.perf_counter() - t, "steps": r.steps,
                     "path": "gram" if r.gram else "minibatch", "refit": "target_inputs" in kw and kw["target_inputs"] is not None,
                     "error_nearest": r.error_nearest, "error_adaptive": r.error_adaptive})
        return r

    rounding_mod.adaptive_round = refit_mod.adaptive_round = timed
    try:
        t = time.perf_counter()
        res = laqonnx.quantize(model, out, str(calib), avg_weight_bits=4, progress=False)
        total = time.perf_counter() - t
    finally:
        rounding_mod.adaptive_round = refit_mod.adaptive_round = original
    return {"seconds": total, "stages": dict(res.timings), "avg_weight_bits": res.avg_weight_bits,
            "rounding_seconds": sum(f["seconds"] for f in fits), "fits": fits,
            "adaptive_layers": sum(lp.chosen.weight is not None and lp.chosen.weight.rounding == "adaptive"
                                   for lp in res.plan.layers), "layers": len(res.plan.layers),
            "guard_kept": None if res.plan.guard is None else res.plan.guard.kept}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="112x112, width 32, no per-layer fits")
    ap.add_argument("--runs", type=int, default=1, help="quantize runs (median)")
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer Gram vs minibatch fits")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adaround_resnet18.json"), help="result JSON")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    size, width = (112, 32) if args.quick else (224, 64)
    result: dict = {
        "command": "python benchmarks/adaround_resnet18.py" + (" --quick" if args.quick else "")
                   + (" --no-layers" if args.no_layers else "") + f" --runs {args.runs}",
        "model": f"laqonnx.zoo.models.resnet18_like(width={width}) at 3x{size}x{size}, random weights",
        "calibration": "64 uniform-random images in [0,1]; adversarial calibration at the default eps 8/255",
        "git_commit": _git_commit(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
    }
    if not (args.quick or args.no_layers):
        result["layer_fits"] = layer_fits(128)
    net, _ = _resnet18(width, size)
    x = np.random.default_rng(0).uniform(0, 1, (64, 3, size, size)).astype(np.float32)
    runs = []
    with tempfile.TemporaryDirectory(prefix="laqonnx-bench-") as tmpdir:
        tmp = Path(tmpdir)
        model, calib = tmp / "resnet18.onnx", tmp / "calib.npz"
        _export(net, size, model)
        np.savez(calib, x=x)
        for i in range(max(1, args.runs)):
            r = quantize_run(model, tmp / f"int4_{i}.onnx", calib)
            runs.append(r)
            print(f"quantize --avg-weight-bits 4, run {i}: {r['seconds']:.1f} s, adaptive rounding {r['rounding_seconds']:.1f} s "
                  f"over {len(r['fits'])} fits ({sum(f['path'] == 'gram' for f in r['fits'])} through the Gram matrix), "
                  f"{r['adaptive_layers']}/{r['layers']} layers adaptive", flush=True)
    result["quantize_runs"] = runs
    result["quantize_median_s"] = statistics.median(r["seconds"] for r in runs)
    result["rounding_median_s"] = statistics.median(r["rounding_seconds"] for r in runs)
    result["machine"]["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("quantize_median_s", "rounding_median_s")}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
