"""Consistency where it matters: does the metric's predicted sum rank the measured loss of quantized models?

    python benchmarks/consistency.py            # 4 models x 30 random mixed plans -> results/consistency.json

For each model: calibrate and score every candidate once (``plan_model``, default candidates with
int8 and int4 weights, adaptive rounding included), then draw random mixed plans (each layer int4
with a probability drawn per plan, a random setting of that width, a random activation range method
per tensor), lower each through onnxruntime's quantizer and measure, on the metric's calibration
examples (clean + their PGD examples on the float model), the loss the metric predicts:
``E ||P(f_hat - f)(x)||^2 + E ||P([f_hat - f](x') - [f_hat - f](x))||^2`` (centred logits). The
Spearman correlation of predicted vs measured over the plans is the figure (goal >= 0.8).
Models: a CNN PGD-trained on real MNIST (zoo), andrey_mnist and zuramai_mnist (real exports, the
latter in [-1, 1]), the CIFAR ResNet-20 from ../shared/real-models (calibrated on clipped noise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT / ".." / "shared" / "real-models"

from laqonnx._util.io import atomic_write_json  # noqa: E402


def _models():
    from laqonnx.zoo import get_model

    z = get_model("cnn", "pgd", seed=0, dataset="mnist", eps=0.3, progress=False)
    noise = np.clip(np.random.default_rng(0).normal(0, 1, (128, 3, 32, 32)), -3, 3).astype(np.float32)
    return [
        ("mnist-cnn-pgd (zoo)", str(z.path), "mnist", 0.3, None),
        ("andrey_mnist (real)", str(REAL / "andrey_mnist.onnx"), "mnist", 0.1, None),
        ("zuramai_mnist (real, [-1,1])", str(REAL / "zuramai_mnist.onnx"), "mnist", 0.2, (-1.0, 1.0)),
        ("onnc_resnet20 (real, CIFAR)", str(REAL / "onnc_resnet20.onnx"), (noise, None), 0.05, (-3.0, 3.0)),
    ]


def measure(name, path, calib, eps, input_range, plans: int, seed: int) -> dict:
    from scipy.stats import kendalltau, spearmanr

    from laqonnx.graph import load_model
    from laqonnx.quant.costs import AvgBits, Choice
    from laqonnx.quant.guard import OrtRunner, calibration_loss, logits_view
    from laqonnx.quant.planning import QuantizeOptions, build_plan, plan_model

    pm = load_model(path)
    t = time.perf_counter()
    planned = plan_model(pm, calib, QuantizeOptions(eps=eps, budget=AvgBits(8.0), input_range=input_range, calib_limit=256,
                                                    guard=False), progress=False)
    score_s = time.perf_counter() - t
    scored, cal = planned.scored, planned.calibration
    data = cal.data.pairs(64)
    ref_run = OrtRunner(logits_view(pm.model, pm.output_name), pm.input_name, pm.fixed_batch)
    ref = (ref_run(data.clean), ref_run(data.adversarial))
    rng = np.random.default_rng(seed)
    pred, meas, bits = [], [], []
    for _ in range(plans):
        p4 = rng.uniform()
        weights = {}
        for lt in scored.layers:
            want4 = rng.uniform() < p4
            pool = [k for k, s in enumerate(lt.scores) if (s.setting.bits == 4) == want4] or list(range(len(lt.scores)))
            weights[lt.layer.name] = int(rng.choice(pool))
        acts = {t: int(rng.integers(len(v))) for t, v in scored.tensors.items()}
        _, q, _ = build_plan(pm, scored, cal, Choice(weights, acts, 0, 0.0), QuantizeOptions().candidates)
        run = OrtRunner(logits_view(q, pm.output_name), pm.input_name, pm.fixed_batch)
        clean, adv = calibration_loss(ref, (run(data.clean), run(data.adversarial)))
        meas.append(clean + adv)
        pred.append(sum(lt.scores[weights[lt.layer.name]].metric for lt in scored.layers)
                    + sum(scored.tensors[t][i].metric for t, i in acts.items()))
        total = sum(int(np.prod(lt.layer.weight_shape)) for lt in scored.layers)
        bits.append(sum(lt.scores[weights[lt.layer.name]].cost_bits for lt in scored.layers) / total)
    rho = float(spearmanr(pred, meas)[0])
    tau = float(kendalltau(pred, meas)[0])
    ratio = float(np.median(np.array(pred) / np.array(meas)))
    print(f"{name}: Spearman {rho:.3f}, Kendall {tau:.3f}, median predicted/measured {ratio:.2f} over {plans} plans "
          f"({min(bits):.2f}-{max(bits):.2f} bits); scoring {score_s:.1f} s", flush=True)
    return {"model": name, "path": path, "eps": eps, "plans": plans, "spearman": rho, "kendall": tau,
            "median_predicted_over_measured": ratio, "bits_range": [min(bits), max(bits)], "scoring_seconds": score_s,
            "examples": len(data.clean), "predicted": pred, "measured": meas, "avg_bits": bits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "consistency.json")
    args = ap.parse_args()
    rows = [measure(*m, plans=args.plans, seed=args.seed) for m in _models()]
    atomic_write_json(args.out, {"command": "python benchmarks/consistency.py", "goal": "Spearman >= 0.8 on every model",
                                 "met": all(r["spearman"] >= 0.8 for r in rows), "models": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
