"""A peer's AdaRound for the record's low-bit regimes: Qualcomm AIMET (``aimet-onnx``) at int4 weights.

Runs **inside AIMET's own environment** (it is never a laqonnx dependency; see ../shared/DESIGN.md
§5 for how it installs here), called by ``benchmarks/record.py`` for its ``aimet-int4-ada`` cells:

    python -m venv /work/aenv --system-site-packages
    /work/aenv/bin/pip install --no-deps aimet-onnx==2.42.0 onnx2torch
    /work/aenv/bin/pip install bokeh hvplot jsonschema osqp pybind11 PyYAML scipy Jinja2 psutil
    /work/aenv/bin/python benchmarks/aimet_int4.py model.onnx out.onnx calib.npz [--iterations 1000]

Settings, chosen to match ``ort-int4`` (the uniform rule it is compared with) except for the
rounding: int4 symmetric per-channel weights (AIMET's ``default_config_per_channel.json``), 8-bit
asymmetric activations with min-max ranges (``quant_scheme="min_max"``), AdaRound on every Conv /
Gemm / MatMul in graph order (``aimet_onnx.apply_adaround``) on the calibration digits, then the
encodings computed on the same digits. The model's outputs (the logits) are left unquantized, as
onnxruntime's ``quantize_static`` leaves them (AIMET's default config would quantize them to 8 bits
too). Written with ``sim.to_onnx_qdq(prequantize_constants=True)``: INT4 weight initializers behind
DequantizeLinear at opset 21, uint8 activations; the caller checks the model loads, runs and keeps
4-bit weights. Prints ``SECONDS <wall time>`` (load to written file).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("calib", help=".npz with x (N, ...) float32 calibration inputs")
    ap.add_argument("--iterations", type=int, default=1000, help="AdaRound steps per layer (default 1000)")
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()

    import aimet_onnx
    from aimet_onnx.common import quantsim_config

    t0 = time.perf_counter()
    model = onnx.load(a.model)
    name = model.graph.input[0].name
    x = np.load(a.calib)["x"].astype(np.float32)
    inputs = [{name: x[i:i + a.batch]} for i in range(0, len(x), a.batch)]
    config = os.path.join(os.path.dirname(quantsim_config.__file__), "default_config_per_channel.json")
    sim = aimet_onnx.QuantizationSimModel(model, param_type="int4", activation_type="int8",
                                          quant_scheme="min_max", config_file=config)
    for out in model.graph.output:  # logits stay float, as onnxruntime's quantize_static leaves them
        if out.name in sim.qc_quantize_op_dict:
            sim.qc_quantize_op_dict[out.name].enabled = False
    aimet_onnx.apply_adaround(sim, inputs, num_iterations=a.iterations)
    sim.compute_encodings(inputs)
    qdq = sim.to_onnx_qdq(prequantize_constants=True)
    onnx.save(qdq, a.out)
    print("SECONDS", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
