"""Benchmark: int4 MatMul via onnxruntime's MatMulNBits vs int8 vs float on an MLP 784-2048-2048-10.

    python benchmarks/matmulnbits.py [--rounds 10] [--runs 100] [--batch 1 32]

Variants, all written by ``laqonnx.quant.lower.lower`` from the same float model (random weights,
N(0, 1/fan_in); latency does not depend on them) with activation ranges from 64 random inputs:

- ``float``: the model itself;
- ``int8``: int8 per-channel weights, uint8 activations (onnxruntime fuses QGemm);
- ``int4_unfused``: int4 per-channel weights in the quantizer's layout (``nbits=None``: DQ -> Gemm, what
  laqonnx wrote before issue 13);
- ``int4_nbits``: int4 per-channel weights in the MatMulNBits form (``NBits()``, the default);
- ``int4_nbits_b32`` / ``_b128``: int4 block-wise over K, blocks of 32 / 128 (``NBits(block_size=...)``).

Latency: ``laqonnx.latency.compare_latency`` (interleaved round-robin, medians) at each batch size;
bytes: the serialized model. The check also records that each int4 MatMulNBits variant is fused
(optimized graph). Goal (issue 13): int4 MatMulNBits <= 1.2x the int8 latency at <= 0.6x its bytes.
Writes ``benchmarks/results/matmulnbits.json`` with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from laqonnx.latency import compare_latency, cpu_info  # noqa: E402
from laqonnx.quant.lower import LoweringSpec, lower, quantized_tensors  # noqa: E402
from laqonnx.quant.nbits import NBits  # noqa: E402
from laqonnx.quant.numerics import PerChannel, WeightQuant, weight_qparams  # noqa: E402

DIMS = (784, 2048, 2048, 10)


def mlp(dims=DIMS, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        inits += [numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(a), (b, a)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, b).astype(np.float32), f"b{i}")]
        out = "logits" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out], name=f"fc{i}", transB=1))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", dims[0]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", dims[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def ranges(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[float, float]]:
    import onnxruntime as ort

    names = quantized_tensors(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in names:
        if t not in have:
            m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in m.graph.output], sess.run(None, {"input": x})))
    return {t: (float(values[t].min()), float(values[t].max())) for t in names}


def variants(model: onnx.ModelProto, x: np.ndarray) -> dict[str, onnx.ModelProto]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    rng = ranges(model, x)
    ws = [n for n in inits if n.startswith("w")]

    def q(bits: int, nbits):
        weights = {w: weight_qparams(inits[w], WeightQuant(bits, PerChannel(0))) for w in ws}
        return lower(model, LoweringSpec(weights=weights, ranges=rng, nbits=nbits))

    return {"float": model, "int8": q(8, NBits()), "int4_unfused": q(4, None), "int4_nbits": q(4, NBits()),
            "int4_nbits_b32": q(4, NBits(block_size=32)), "int4_nbits_b128": q(4, NBits(block_size=128))}


def fused_count(model: onnx.ModelProto) -> int:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "o.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sum(n.op_type == "MatMulNBits" for n in onnx.load(str(Path(tmp) / "o.onnx")).graph.node)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "matmulnbits.json"))
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    model = mlp()
    x = np.random.default_rng(1).uniform(0, 1, (64, DIMS[0])).astype(np.float32)
    models = variants(model, x)
    sizes = {k: m.ByteSize() for k, m in models.items()}
    fused = {k: fused_count(m) for k, m in models.items()}
    res = compare_latency(models, rounds=args.rounds, runs=args.runs, batch_sizes=tuple(args.batch), threads=args.threads)
    lat = {k: {str(s.batch_size): s.p50_ms for s in r.stats} for k, r in res.items()}
    rows = {}
    for k in models:
        rows[k] = {"bytes": sizes[k], "bytes_vs_int8": sizes[k] / sizes["int8"], "matmulnbits_nodes": fused[k],
                   "p50_ms": lat[k], "latency_vs_int8": {b: lat[k][b] / lat["int8"][b] for b in lat[k]},
                   "latency_vs_float": {b: lat[k][b] / lat["float"][b] for b in lat[k]}}
    goal = {k: {"latency_ok": rows[k]["latency_vs_int8"]["1"] <= 1.2 if "1" in rows[k]["latency_vs_int8"] else None,
                "bytes_ok": rows[k]["bytes_vs_int8"] <= 0.6} for k in rows if k.startswith("int4_nbits")}
    out = {"benchmark": "matmulnbits", "dims": DIMS, "rounds": args.rounds, "runs": args.runs,
           "threads": res["float"].threads, "cpu": cpu_info().model_name, "platform": platform.platform(),
           "onnxruntime": __import__("onnxruntime").__version__, "load_average_before": load_before,
           "load_average_after": os.getloadavg(), "variants": rows, "goal_<=1.2x_int8_latency_<=0.6x_bytes": goal}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for k, r in rows.items():
        print(f"{k:16s} {r['bytes'] / 2**20:7.2f} MiB ({r['bytes_vs_int8']:.2f}x int8)  MatMulNBits {r['matmulnbits_nodes']}  "
              + "  ".join(f"b{b}: {ms:.3f} ms ({r['latency_vs_int8'][b]:.2f}x int8, {r['latency_vs_float'][b]:.2f}x float)"
                          for b, ms in r["p50_ms"].items()))
    print(f"load average {load_before} -> {out['load_average_after']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
