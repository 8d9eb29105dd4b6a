"""Evaluation throughput on Ray: ``laqonnx.evaluate`` locally vs ``engine=Ray(workers=W)`` on a digits CNN.

The model is the small CNN the tests train on 8x8 digits in a few seconds (``tests/_digits_model.py``),
quantized to int8 QDQ (per-channel); its float export is the transfer reference. Each engine runs
``--repeats`` times, interleaved (local, ray w=1, ray w=2, local, ...), on the first N test examples
at L-inf eps = 0.1 with the quick preset's budgets, no latency, no sweep, 1 thread per worker. The
figure is ``N x attacks / wall seconds`` of the whole ``evaluate`` call; the Ray cluster is started
once beforehand (``ray.init(num_cpus=os.cpu_count())``, its start-up time reported apart), while the
per-call worker start-up (actors importing torch/ART and building sessions and mirrors) is included.
``--preset`` picks the budgets (each preset's result is kept under ``runs`` in the JSON). Every run's JSON figures (without timings) must be identical across engines; the benchmark checks it.

Sharding: a model's work is attacks x ceil(clean-correct / batch_size) shards, run one at a time per
worker; more workers than shards cannot help, and the slowest shard (square's black-box queries, or
apgd) bounds the wall time. The machine is shared: the load average is recorded with the timings.

    python benchmarks/evaluate_ray.py [--n 200] [--batch-size 25] [--repeats 3] [--workers 1 2] [--preset quick]
                                      [--address ADDR]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "evaluate_ray.json"
EPS = 0.1
ATTACKS = ("fgsm", "pgd", "apgd-ce", "transfer", "square")


def _figures(data: dict) -> dict:
    out = {k: v for k, v in data.items() if k != "engine"}
    out["models"] = [{k: v for k, v in m.items() if k != "attack_seconds"} for m in data["models"]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="examples (default 200)")
    ap.add_argument("--batch-size", type=int, default=25, help="attack batch = shard size (default 25)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--preset", default="quick", help="attack budgets (default quick)")
    ap.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args(argv)

    import numpy as np
    import onnx
    import ray

    import laqonnx
    from laqonnx._util.io import atomic_write_json
    from laqonnx.robustness.distributed import Local, Ray
    from tests._digits_model import digits_cnn, quantize

    _, model, x, y, calib = digits_cnn()
    work = Path(tempfile.mkdtemp(prefix="evaluate_ray_"))
    onnx.save(model, str(work / "float.onnx"))
    onnx.save(quantize(model, calib, per_channel=True), str(work / "int8.onnx"))
    data = (x[:args.n], y[:args.n])
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    ray.init(address=args.address, num_cpus=None if args.address else os.cpu_count(), include_dashboard=False,
             log_to_driver=False, logging_level="ERROR")
    cluster_start = time.perf_counter() - t0
    engines = {"local": Local(), **{f"ray-w{w}": Ray(address=args.address, workers=w) for w in args.workers}}
    times: dict[str, list[float]] = {k: [] for k in engines}
    seconds: dict[str, dict] = {}
    reference_figures = None
    n_examples = n_correct = 0
    for rep in range(args.repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            report = laqonnx.evaluate(work / "int8.onnx", data, EPS, attacks=list(ATTACKS), reference=work / "float.onnx", preset=args.preset,
                                      batch_size=args.batch_size, latency=False, sweep=False, progress=False,
                                      threads=1, seed=0, engine=engine)
            times[name].append(time.perf_counter() - start)
            js = report.to_json()
            seconds[name] = js["models"][0]["attack_seconds"]
            if reference_figures is None:
                reference_figures = _figures(js)
                n_examples = report.models[0].n_examples
                n_correct = round(report.models[0].clean_accuracy * n_examples)
            elif _figures(js) != reference_figures:
                raise SystemExit(f"{name} repeat {rep}: figures differ from the first run")
            print(f"{name} repeat {rep}: {times[name][-1]:.2f} s", file=sys.stderr)
    ray.shutdown()
    load_after = os.getloadavg()
    shards_per_attack = -(-n_correct // args.batch_size)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "evaluate_ray",
        "model": "tests/_digits_model.py digits CNN (8x8), int8 QDQ per-channel; float export as transfer reference",
        "n_examples": n_examples, "clean_correct": n_correct, "attacks": list(ATTACKS), "eps": EPS,
        "preset": args.preset, "batch_size": args.batch_size, "threads_per_worker": 1, "repeats": args.repeats,
        "shards": {"per_attack": shards_per_attack, "total": shards_per_attack * len(ATTACKS)},
        "cluster": args.address or f"local, ray.init(num_cpus={os.cpu_count()})",
        "cluster_start_seconds": round(cluster_start, 2),
        "wall_seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "median_seconds": {k: round(v, 2) for k, v in med.items()},
        "throughput_example_attacks_per_s": {k: round(n_examples * len(ATTACKS) / v, 1) for k, v in med.items()},
        "speedup_vs_local": {k: round(med["local"] / v, 2) for k, v in med.items()},
        "attack_seconds_last_run": seconds,
        "mean_shard_seconds_last_run": {k: {a: round(v / shards_per_attack, 3) for a, v in s.items()}
                                        for k, s in seconds.items()},
        "figures_identical_across_engines": True,
        "robust_accuracy": reference_figures["models"][0]["robust_accuracy"],
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in load_after],
        "cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
        "numpy": np.__version__,
        "note": "machine shared with a long benchmark on both cores: timings are noisy; ray timings include the "
                "per-call worker start-up (actors import torch/ART, build sessions + mirrors), not the cluster's",
    }
    # one file, one entry per preset: {"benchmark": ..., "runs": {"quick": {...}, "standard": {...}}}
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    runs = old.get("runs", {old["preset"]: old} if "preset" in old else {})
    runs[args.preset] = result
    atomic_write_json(out, {"benchmark": "evaluate_ray", "runs": runs})
    print(f"wrote {args.out}", file=sys.stderr)
    for k in engines:
        print(f"{k:8s} median {med[k]:6.2f} s  {result['throughput_example_attacks_per_s'][k]:7.1f} example-attacks/s"
              f"  x{result['speedup_vs_local'][k]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
