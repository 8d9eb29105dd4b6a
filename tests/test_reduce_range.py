"""7-bit int8 weights (reduce_range): onnxruntime's int8 kernels on x86 without VNNI add pairs of
uint8 x int8 products in 16 bits and saturate with full-range weights; 7-bit weights cannot."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from laqonnx.graph import load_model
from laqonnx.latency import cpu_info, parse_cpuinfo
from laqonnx.quant.lower import LoweringSpec, lower
from laqonnx.quant.numerics import ActivationQuant, PerChannel, WeightQuant, activation_qparams, fake_quant, weight_qparams
from tests import models


def _case():
    """One Gemm whose weights all sit at the int8 extremes, fed inputs near the top of their range:
    every pair of products is near 2 x 255 x 127, past int16."""
    model = models.mlp(seed=0, dims=(64, 8))
    w = np.where(np.random.default_rng(1).uniform(size=(8, 64)) < 0.5, -1.0, 1.0).astype(np.float32)
    w[:, ::2] = np.abs(w[:, ::2])  # same-sign neighbours: the pair sums add up
    w[:, 1::2] = np.abs(w[:, 1::2])
    w[4:] *= -1
    for init in model.graph.initializer:
        if init.name == "w0":
            init.CopyFrom(numpy_helper.from_array(w, "w0"))
    x = np.random.default_rng(2).uniform(0.9, 1.0, (16, 64)).astype(np.float32)
    return model, w, x


def _run(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.parametrize("reduce_range", [False, True])
def test_written_int8_matches_fake_quant_only_with_7_bit_weights_where_int8_saturates(reduce_range):
    model, w, x = _case()
    pm = load_model(model, allow_quantized=False)
    qw = weight_qparams(w, WeightQuant(8, PerChannel(0), reduce_range=reduce_range))
    act = activation_qparams(0.0, 1.0, ActivationQuant())
    spec = LoweringSpec(weights={"w0": qw}, ranges={"input": (0.0, 1.0), "logits": (-80.0, 80.0)},
                        values={"w0": fake_quant(w, qw)})
    q = lower(pm.model, spec)
    assert [n.op_type for n in q.graph.node if n.op_type == "DequantizeLinear"]  # a QDQ model onnxruntime fuses
    b = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b0"))
    want = fake_quant(x, act) @ fake_quant(w, qw).T + b  # what the QDQ model means
    err = float(np.abs(_run(q, x) - want).max())
    quantum = 160.0 / 255  # the output QDQ's step
    if reduce_range or not cpu_info().int8_saturates():
        assert err <= quantum, err
    else:  # full range on an AVX2 CPU without VNNI: saturated far beyond the output quantum
        assert err > 4 * quantum, err


def test_int8_saturates_only_on_x86_without_vnni_or_amx():
    base = "processor : 0\nmodel name : X\nflags : fpu sse2 avx avx2{}\n"
    assert parse_cpuinfo(base.format("")).int8_saturates()
    assert not parse_cpuinfo(base.format(" avx512f avx512_vnni")).int8_saturates()
    assert not parse_cpuinfo(base.format(" avx_vnni")).int8_saturates()
    assert not parse_cpuinfo(base.format(" amx_int8 amx_tile")).int8_saturates()
    assert not parse_cpuinfo("processor : 0\nFeatures : fp asimd asimddp\n").int8_saturates()  # Arm


def test_quantize_auto_reduce_range_follows_the_cpu_and_the_plan_keeps_it(tmp_path, monkeypatch):
    import laqonnx
    import laqonnx.latency.cpu as cpu
    from laqonnx.quant.plan import Plan

    model = models.mlp(seed=4, dims=(16, 12, 5))
    x = models.random_input(model, n=32, seed=1)
    for saturates in (True, False):
        fake = parse_cpuinfo("processor : 0\nmodel name : T\nflags : avx2" + ("" if saturates else " avx512_vnni") + "\n")
        monkeypatch.setattr(cpu, "cpu_info", lambda: fake)
        monkeypatch.setattr("laqonnx.latency.cpu_info", lambda: fake)
        out = tmp_path / f"q{saturates}.onnx"
        res = laqonnx.quantize(model, out, x, eps=0.0, adversarial_calib=False, progress=False)
        assert {lp.chosen.weight.reduce_range for lp in res.plan.layers} == {saturates}
        assert any("7 bits" in w for w in res.plan.warnings) == saturates
        again = Plan.load(res.plan_path)
        assert {lp.chosen.weight.reduce_range for lp in again.layers} == {saturates}
        ints = [numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer if i.data_type == onnx.TensorProto.INT8]
        assert ints and (max(int(np.abs(v).max()) for v in ints) <= 64) == saturates
    explicit = laqonnx.quantize(model, tmp_path / "r.onnx", x, eps=0.0, adversarial_calib=False, progress=False,
                                reduce_range=True)
    assert all(lp.chosen.weight.reduce_range for lp in explicit.plan.layers)
