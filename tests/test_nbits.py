"""int4 MatMul/Gemm weights are written in the form onnxruntime fuses into com.microsoft.MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from laqonnx.errors import OptionError
from laqonnx.quant.lower import LoweringSpec, lower, quantized_tensors
from laqonnx.quant.nbits import NBits
from laqonnx.quant.numerics import PerChannel, PerTensor, WeightQuant, dequantize, weight_qparams
from tests import models
from tests.test_lower import _minmax_ranges


def _optimized(model: onnx.ModelProto, tmp_path) -> tuple[onnx.ModelProto, ort.InferenceSession]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "opt.onnx")), sess


def _mlp_int4(gran, nbits):
    model = onnx.shape_inference.infer_shapes(models.mlp(seed=3, dims=(64, 128, 10)))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = {w: weight_qparams(inits[w], WeightQuant(4, gran)) for w in ("w0", "w1")}
    x = models.random_input(model, n=5, seed=1)
    # the float model's ranges, doubled: int4 errors push values past them, and saturation is not what is tested here
    ranges = {t: (2 * lo, 2 * hi) for t, (lo, hi) in _minmax_ranges(model, x).items()}
    return model, inits, weights, x, lower(model, LoweringSpec(weights=weights, ranges=ranges, nbits=nbits)), ranges


def _reference(inits, weights, x, blocked: int | None = None):
    h = x
    for i in range(2):
        w = inits[f"w{i}"]
        if blocked:
            wt = w.T.reshape(-1, blocked, w.shape[0])
            s = np.abs(wt).max(axis=1, keepdims=True) / 7
            wd = (np.clip(np.rint(wt / s), -8, 7) * s).reshape(w.shape[1], w.shape[0]).T
        else:
            qp = weights[f"w{i}"]
            wd = dequantize(np.clip(np.rint(w / qp._broadcast(2)[0]), -7, 7).astype(np.int8), qp)
        h = h @ wd.T + inits[f"b{i}"]
        if i == 0:
            h = np.maximum(h, 0)
    return h


@pytest.mark.parametrize("gran,block", [(PerChannel(0), None), (PerTensor(), None), (PerChannel(0), 32)])
def test_int4_gemm_is_fused_into_matmulnbits(gran, block, tmp_path):
    _model, inits, weights, x, q, ranges = _mlp_int4(gran, NBits(block_size=block))
    onnx.checker.check_model(q, full_check=True)
    assert not [n for n in q.graph.node if n.op_type == "Gemm"]
    opt, sess = _optimized(q, tmp_path)
    fused = [n for n in opt.graph.node if (n.domain, n.op_type) == ("com.microsoft", "MatMulNBits")]
    assert len(fused) == 2
    got = sess.run(None, {"input": x})[0]
    ref = _reference(inits, weights, x, block)
    # the output's own 8-bit step, plus the int4 weight quantum (what MatMulNBits' int8 input adds is far below it)
    lo, hi = ranges["logits"]
    quantum = max(float(np.max(weights[w].scale)) for w in ("w0", "w1"))
    err = float(np.max(np.abs(got - ref)))
    assert err <= (hi - lo) / 255 + quantum, err


def test_nbits_off_keeps_the_quantizer_layout(tmp_path):
    _, _, _, _, q, _ = _mlp_int4(PerChannel(0), None)
    opt, _ = _optimized(q, tmp_path)
    assert [n for n in q.graph.node if n.op_type == "Gemm"]
    assert not [n for n in opt.graph.node if n.op_type == "MatMulNBits"]


def _matmul_add(k: int = 64, n: int = 32) -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("MatMul", ["input", "wm"], ["mm"], name="matmul"), h.make_node("Add", ["mm", "bm"], ["logits"], name="add")],
        "mm", [h.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", k])],
        [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(rng.normal(0, 0.2, (k, n)).astype(np.float32), "wm"),
         numpy_helper.from_array(rng.normal(0, 0.1, n).astype(np.float32), "bm")])
    return onnx.shape_inference.infer_shapes(h.make_model(graph, opset_imports=[h.make_opsetid("", 13)]))


def test_int4_matmul_followed_by_add_is_fused(tmp_path):
    model = _matmul_add()
    w = numpy_helper.to_array(model.graph.initializer[0])
    qp = weight_qparams(w, WeightQuant(4, PerChannel(1)))
    x = models.random_input(model, n=3, seed=2)
    ranges = {t: (2 * lo, 2 * hi) for t, (lo, hi) in _minmax_ranges(model, x).items()}
    q = lower(model, LoweringSpec(weights={"wm": qp}, ranges=ranges))
    opt, sess = _optimized(q, tmp_path)
    assert [n.op_type for n in opt.graph.node].count("MatMulNBits") == 1
    wd = dequantize(np.clip(np.rint(w / qp.scale[None]), -7, 7).astype(np.int8), qp)
    ref = x @ wd + numpy_helper.to_array(model.graph.initializer[1])
    lo, hi = ranges["logits"]
    assert np.max(np.abs(sess.run(None, {"input": x})[0] - ref)) <= 2 * (hi - lo) / 255 + float(qp.scale.max())


def test_int8_layers_untouched():
    model = onnx.shape_inference.infer_shapes(models.concat())
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = {k: weight_qparams(inits[k], WeightQuant(8, PerChannel(1 if k == "wm" else 0))) for k in ("wl", "wr", "wm")}
    spec = {"weights": weights, "ranges": {t: (-20.0, 20.0) for t in quantized_tensors(model)}}
    a, b = lower(model, LoweringSpec(**spec)), lower(model, LoweringSpec(**spec, nbits=None))
    assert a.SerializeToString() == b.SerializeToString()


@pytest.mark.parametrize("bad", [8, 24, 0, True, 32.0])
def test_block_size_checked(bad):
    with pytest.raises(OptionError, match="power of two"):
        NBits(block_size=bad)


def test_blockwise_nbits_model_is_read_back_by_the_intake():
    """A model written with NBits(block_size) loads as a quantized model (evaluate, analyze): its
    blocked DequantizeLinear weights become exactly the block-wise dequantized floats."""
    from laqonnx.graph import load_model

    _model, inits, weights, x, q, _ = _mlp_int4(PerChannel(0), NBits(block_size=32))
    assert any(a.name == "block_size" for n in q.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)
    pm = load_model(q, allow_quantized=True)
    assert [lay.name for lay in pm.layers] and len(pm.layers) == 2
    for i, lay in enumerate(pm.layers):
        w = inits[f"w{i}"]
        wt = w.T.reshape(-1, 32, w.shape[0])
        s = (np.abs(wt).max(axis=1, keepdims=True) / 7).astype(np.float32)
        ref = (np.clip(np.rint(wt / s), -8, 7).astype(np.float32) * s).reshape(w.shape[1], w.shape[0]).T
        got = pm.weight(lay)
        assert got.shape in (ref.shape, ref.T.shape)
        np.testing.assert_allclose(got if got.shape == ref.shape else got.T, ref, rtol=0, atol=1e-6)
    # and onnxruntime runs the blocked model close to the block-wise reference (int8 activations aside)
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    ref_out = _reference(inits, weights, x, 32)
    assert np.max(np.abs(sess.run(None, {"input": x})[0] - ref_out)) < 0.2 * np.abs(ref_out).max()


def test_blocked_dequantize_rejects_bad_scale_shapes():
    from laqonnx.graph.qdq import _dequantize_blocked

    x = np.arange(-8, 8, dtype=np.int64).reshape(4, 4)
    assert isinstance(_dequantize_blocked(x, np.ones((3, 4), np.float32), np.zeros((3, 4), np.int64), 2, 0, onnx.TensorProto.INT4), str)
    got, qp = _dequantize_blocked(x, np.array([[1, 2, 3, 4], [0.5, 1, 1, 1]], np.float32), np.zeros((2, 4), np.int64), 3, 0,
                                  onnx.TensorProto.INT4)
    assert qp is None
    np.testing.assert_array_equal(got[:3], x[:3] * np.array([1, 2, 3, 4]))
    np.testing.assert_array_equal(got[3], x[3] * np.array([0.5, 1, 1, 1]))
