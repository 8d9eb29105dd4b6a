"""Adaptive rounding: laqonnx vs the peers' AdaRound on the same model, time and error.

The model: the zoo's PGD-trained MNIST CNN (seed 0). Calibration: the same 256 training digits.
Two widths, each against the peer that offers it:

* **int8 per-channel weights, uint8 activations** against AMD Quark 0.13 (``quark.onnx``), whose
  ONNX AdaRound has no int4: its ``AdaRoundConfig`` with its defaults (1000 iterations per layer).
* **int4 per-channel weights, uint8 activations** (the record's all-int4 regime) against Qualcomm
  AIMET 2.42 (``aimet-onnx``; ``benchmarks/aimet_int4.py``, the logits left unquantized as
  onnxruntime leaves them) at 1000 iterations per layer and at 15000 (its recommendation below 8
  bits).

laqonnx has adaptive rounding forced on every layer (``CandidateSpace(weight_bits=(b,),
rounding="adaptive")``, per-channel max-abs weights, min-max activations, no guard) and runs four
ways per width: its default (rounding fitted on clean and PGD activations, then re-fitted in order
on the quantized model's inputs), on clean calibration only (the peers' setting: the goals'
comparison), the same without the in-order re-fit, and round-to-nearest (where both start from).
Each tool runs once per repeat, alternating; wall time from call to written file (the peers'
own figure, load to write, without their imports). Error: on the 1000 test digits, the mean
squared logit error against the float model and top-1 agreement with it (the models'
output-level reconstruction error), plus clean accuracy.

The peers need other onnx/numpy versions, so each runs in its own environment:

    python -m venv /work/qenv --system-site-packages && /work/qenv/bin/pip install amd-quark==0.13
    (AIMET: the commands in benchmarks/aimet_int4.py, into /work/aenv)

    python benchmarks/adaround_peers.py [--repeats 1] [--widths 8,4]

Writes benchmarks/results/adaround_peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUARK_SCRIPT = r'''
import sys, time, numpy as np
from onnxruntime.quantization import CalibrationDataReader
from quark.onnx import ModelQuantizer
from quark.onnx.quantization.config.config import QConfig
from quark.onnx.quantization.config.spec import QLayerConfig, Int8Spec, UInt8Spec, QuantGranularity, CalibMethod
from quark.onnx.quantization.config.algorithm import AdaRoundConfig
src, out, calib = sys.argv[1:4]
x = np.load(calib)["x"]
class Reader(CalibrationDataReader):
    def __init__(self):
        self.batches = [x[i:i + 32] for i in range(0, len(x), 32)]
    def get_next(self):
        return {"input": self.batches.pop(0)} if self.batches else None
cfg = QConfig(global_config=QLayerConfig(activation=UInt8Spec(calibration_method=CalibMethod.MinMax),
                                         weight=Int8Spec(quant_granularity=QuantGranularity.Channel,
                                                         calibration_method=CalibMethod.MinMax)),
              algo_config=[AdaRoundConfig()])
t = time.perf_counter()
ModelQuantizer(cfg).quantize_model(src, out, Reader())
print("SECONDS", time.perf_counter() - t)
'''


# laqonnx-adaptive-int<b>: the default (clean + PGD calibration at eps 0.3, rounding fitted on both and
# re-fitted in order on the quantized model's inputs); -clean: clean calibration only, the peers' setting
# (the goal's comparison); -clean-independent: without the in-order re-fit; -nearest: round-to-nearest,
# what adaptive rounding starts from. Peers: quark-adaround-int8 (its defaults), aimet-adaround-int4 at
# 1000 iterations per layer and at 15000 (-15k, AIMET's recommendation below 8 bits).
LAQ_VARIANTS = ("laqonnx-adaptive-int{b}", "laqonnx-adaptive-int{b}-clean", "laqonnx-adaptive-int{b}-clean-independent",
                "laqonnx-nearest-int{b}-clean")
PEER_VARIANTS = {8: ("quark-adaround-int8",), 4: ("aimet-adaround-int4", "aimet-adaround-int4-15k")}


def variants(widths) -> tuple[str, ...]:
    return tuple(v for b in widths for v in (*(k.format(b=b) for k in LAQ_VARIANTS), *PEER_VARIANTS[b]))


def _logits(path, x):
    from laqonnx.graph.session import open_session

    s = open_session(path, threads=1)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quark-python", default="/work/qenv/bin/python", help="python of the environment with amd-quark")
    ap.add_argument("--aimet-python", default="/work/aenv/bin/python", help="python of the environment with aimet-onnx")
    ap.add_argument("--widths", default="8,4", help="weight bits to compare (8: vs Quark, 4: vs AIMET; default 8,4)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    import laqonnx
    from laqonnx.data import open_data
    from laqonnx.quant.metric import CandidateSpace
    from laqonnx.quant.numerics import PerChannel
    from laqonnx.quant.rounding import AdaRoundConfig
    from laqonnx.zoo import get_model

    widths = [int(b) for b in args.widths.split(",")]
    keys = variants(widths)
    zoo = get_model("cnn", "pgd", seed=0, dataset="mnist", eps=0.3, progress=False)
    calib = next(open_data("mnist", input_shape=(None, 1, 28, 28), split="train", limit=256).batches(256))[0]
    x, y = next(open_data("mnist:test", input_shape=(None, 1, 28, 28)).batches(1000))
    ref = _logits(zoo.path, x)
    rows: dict[str, list[dict]] = {k: [] for k in keys}
    with tempfile.TemporaryDirectory(prefix="laqonnx-ada-") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "calib.npz", x=calib)
        (tmp / "quark_run.py").write_text(QUARK_SCRIPT)
        for r in range(args.repeats):
            for key in (keys if r % 2 == 0 else keys[::-1]):
                out = tmp / f"{key}{r}.onnx"
                if key.startswith("laqonnx"):
                    bits = int(key.split("-int")[1][:1])
                    space = CandidateSpace(weight_bits=(bits,), granularities=(PerChannel(),), weight_methods=("maxabs",),
                                           activation_methods=("minmax",),
                                           rounding="nearest" if "nearest" in key else "adaptive",
                                           adaround=AdaRoundConfig(sequential="independent" not in key))
                    clean = "clean" in key  # calibrated (and rounded) on clean data only, as the peers are
                    t = time.perf_counter()
                    laqonnx.quantize(zoo.path, out, (calib, None), eps=0.3, candidates=space, guard=False,
                                     adversarial_calib=False if clean else None, progress=False)
                    secs = time.perf_counter() - t
                else:
                    if key.startswith("quark"):
                        cmd = [args.quark_python, str(tmp / "quark_run.py")]
                    else:
                        cmd = [args.aimet_python, str(ROOT / "benchmarks" / "aimet_int4.py")]
                    cmd += [str(zoo.path), str(out), str(tmp / "calib.npz")]
                    if key.startswith("aimet"):
                        cmd += ["--iterations", "15000" if key.endswith("-15k") else "1000"]
                    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)  # Quark writes quantized_info.csv into its cwd
                    if p.returncode != 0:
                        print(p.stderr[-3000:], file=sys.stderr)
                        return 1
                    secs = float(next(line.split()[1] for line in p.stdout.splitlines() if line.startswith("SECONDS")))
                q = _logits(out, x)
                rows[key].append({"seconds": secs, "logit_mse": float(np.mean((q - ref) ** 2)),
                                  "agreement": float(np.mean(q.argmax(1) == ref.argmax(1))),
                                  "accuracy": float(np.mean(q.argmax(1) == y))})
                print(key, rows[key][-1], flush=True)
    summary = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    goals = {}
    for laq, peer in (("laqonnx-adaptive-int8-clean", "quark-adaround-int8"),
                      ("laqonnx-adaptive-int4-clean", "aimet-adaround-int4"),
                      ("laqonnx-adaptive-int4-clean", "aimet-adaround-int4-15k"),
                      ("laqonnx-adaptive-int4", "aimet-adaround-int4-15k")):  # laqonnx's default, with PGD activations
        if laq in summary and peer in summary:
            a, b = summary[laq], summary[peer]
            goals[f"{laq} vs {peer}"] = {"time_ratio": a["seconds"] / b["seconds"],
                                         "logit_mse_ratio": a["logit_mse"] / b["logit_mse"],
                                         "faster_at_equal_or_better_error": a["seconds"] < b["seconds"] and a["logit_mse"] <= b["logit_mse"]}
    result = {"command": "python benchmarks/adaround_peers.py " + " ".join(sys.argv[1:]), "model": str(zoo.path),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg": os.getloadavg(), "runs": rows,
              "median": summary, "float_accuracy": float(np.mean(ref.argmax(1) == y)), "goals": goals}
    out = ROOT / "benchmarks" / "results" / "adaround_peers.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median", "goals")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
