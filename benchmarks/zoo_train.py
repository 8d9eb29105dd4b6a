"""Training time and clean / PGD robust test accuracy of the zoo's default configs.

    python benchmarks/zoo_train.py [--quick] [--archs cnn,resnet,mobilenet] [--adversarial none,pgd,fgsm-rs] [--runs 1]

Each arch x adversarial default config (``laqonnx.zoo.train.default_config``; ``--quick`` the demo's
shorter ones) is trained ``--runs`` times on the digits split (no cache), single-threaded; the
median training time and the (seeded, hence identical) accuracies are written to
``benchmarks/results/zoo_train[_quick].json`` and printed. The machine may be shared: say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

from laqonnx.zoo.train import default_config, train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo's quick configs")
    parser.add_argument("--archs", default="cnn,resnet,mobilenet", help="comma-separated architectures")
    parser.add_argument("--adversarial", default="none,pgd,fgsm-rs", help="comma-separated training modes")
    parser.add_argument("--runs", type=int, default=1, help="training runs per config (median time)")
    args = parser.parse_args()
    rows = []
    for arch in args.archs.split(","):
        for adv in args.adversarial.split(","):
            config = default_config(arch, adv, quick=args.quick)
            times, wall, result = [], [], None
            for _ in range(args.runs):
                start = time.perf_counter()
                result = train(config, progress=False)
                wall.append(time.perf_counter() - start)
                times.append(result.metrics.train_seconds)
            assert result is not None
            m = result.metrics
            row = {
                "arch": arch,
                "adversarial": adv,
                "epochs": config.epochs,
                "train_seconds_median": round(statistics.median(times), 2),
                "total_seconds_median": round(statistics.median(wall), 2),
                "clean_accuracy": round(m.clean_accuracy, 4),
                "robust_accuracy": round(m.robust_accuracy, 4),
                "catastrophic_overfit": m.catastrophic_overfit,
                "config": dataclasses.asdict(config),
            }
            rows.append(row)
            print(
                f"{arch:10s} {adv:8s} epochs {config.epochs:3d}  train {row['train_seconds_median']:7.2f} s"
                f"  (with eval {row['total_seconds_median']:7.2f} s)  clean {m.clean_accuracy:.3f}"
                f"  PGD-{m.robust_pgd_steps} robust@{m.robust_eps:g} {m.robust_accuracy:.3f}"
                + ("  CATASTROPHIC OVERFIT" if m.catastrophic_overfit else ""),
                flush=True,
            )
    out = Path(__file__).parent / "results" / f"zoo_train{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": f"python benchmarks/zoo_train.py{' --quick' if args.quick else ''}", "runs": args.runs,
               "machine": platform.processor() or platform.machine(), "note": "shared, noisy machine", "rows": rows}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
