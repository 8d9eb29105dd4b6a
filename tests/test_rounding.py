"""Adaptive rounding: never worse than nearest on its own data, one step from nearest, deterministic,
written as an ordinary QDQ model that onnxruntime runs and the mirror matches, re-appliable from the plan."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import laqonnx
from laqonnx.errors import PlanError
from laqonnx.graph import load_model
from laqonnx.quant.numerics import PerChannel, PerTensor, WeightQuant, quantize, weight_qparams
from laqonnx.quant.rounding import AdaRoundConfig, adaptive_round
from laqonnx.quant.scoring import layer_inputs

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    from tests._digits_model import digits_cnn

    _, model, x_test, _, x_calib = digits_cnn()
    path = tmp_path_factory.mktemp("round") / "cnn.onnx"
    onnx.save(model, str(path))
    return path, x_test, x_calib


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_adaptive_never_worse_than_nearest_and_one_step_from_it(cnn, granularity):
    path, _, x = cnn
    pm = load_model(path)
    acts = layer_inputs(pm, x[:64], [layer.input for layer in pm.layers])
    improved = 0
    for layer in pm.layers:
        w = pm.weight(layer)
        gran = PerTensor() if granularity == "tensor" else PerChannel(layer.channel_axis)
        qp = weight_qparams(w, WeightQuant(4, gran, "mse"))
        r = adaptive_round(layer, w, qp, acts[layer.input], AdaRoundConfig(iterations=150))
        assert r.error_adaptive <= r.error_nearest  # on its own calibration data
        nearest = quantize(w, qp).astype(np.int64)
        assert np.abs(r.q.astype(np.int64) - nearest).max() <= 1
        assert r.q.min() >= qp.qmin and r.q.max() <= qp.qmax
        # the reported error is the real one: recompute it in numpy for a Gemm
        improved += r.error_adaptive < 0.95 * r.error_nearest
    assert improved >= 1  # it does something


def test_adaptive_rounding_is_deterministic_for_a_seed(cnn):
    path, _, x = cnn
    pm = load_model(path)
    layer = pm.layers[1]
    acts = layer_inputs(pm, x[:32], [layer.input])[layer.input]
    qp = weight_qparams(pm.weight(layer), WeightQuant(4, PerChannel(0), "mse"))
    a = adaptive_round(layer, pm.weight(layer), qp, acts, AdaRoundConfig(iterations=100, seed=3))
    b = adaptive_round(layer, pm.weight(layer), qp, acts, AdaRoundConfig(iterations=100, seed=3))
    assert np.array_equal(a.q, b.q) and a.error_adaptive == b.error_adaptive


def test_gemm_error_matches_numpy(cnn):
    """The reported output errors of a Gemm layer equal ||(W_hat - W) a||^2 / N computed here."""
    path, _, x = cnn
    pm = load_model(path)
    layer = next(layer for layer in pm.layers if layer.op_type == "Gemm")
    a = layer_inputs(pm, x[:32], [layer.input])[layer.input].astype(np.float64)
    w = pm.weight(layer).astype(np.float64)
    qp = weight_qparams(pm.weight(layer), WeightQuant(4, PerChannel(layer.channel_axis), "mse"))
    r = adaptive_round(layer, pm.weight(layer), qp, a.astype(np.float32), AdaRoundConfig(iterations=60))
    scale = np.asarray(qp.scale, np.float64).reshape(-1, 1)
    for q, err in ((quantize(pm.weight(layer), qp), r.error_nearest), (r.q, r.error_adaptive)):
        d = a @ (q.astype(np.float64) * scale - w).T
        assert err == pytest.approx((d ** 2).sum() / len(a), rel=1e-4)


def _dq_integers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and producer.get(node.input[1]) is not None:
            dq = producer[node.input[1]]
            if dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                out[node.name] = (inits[dq.input[0]].astype(np.int64), inits[dq.input[1]])
    return out


def test_written_model_is_ordinary_qdq_matching_the_mirror_and_the_plan_reapplies(cnn, tmp_path):
    from laqonnx.robustness.mirror import build_mirror

    path, x_test, x_calib = cnn
    out = tmp_path / "ada.onnx"
    res = laqonnx.quantize(path, out, (x_calib, None), eps=0.1, avg_weight_bits=4, rounding="adaptive", progress=False)
    plan = json.loads(res.plan_path.read_text())
    assert plan["settings"]["rounding_file"] == "ada.rounding.npz" and (tmp_path / "ada.rounding.npz").is_file()
    adaptive = [lp for lp in plan["layers"] if lp["chosen"]["weight"]["rounding"] == "adaptive"]
    assert len(adaptive) == len(plan["layers"])
    for lp in adaptive:  # the plan records each layer's reconstruction error, never worse than nearest
        assert lp["rounding_error"]["adaptive"] <= lp["rounding_error"]["nearest"]
    pm = load_model(path)
    q = onnx.load(str(out))
    for name, (ints, scale) in _dq_integers(q).items():
        w = pm.weight(pm.layer(name))
        nearest = np.clip(np.rint(w / np.asarray(scale).reshape((-1,) + (1,) * (w.ndim - 1)) if np.ndim(scale) else
                                  np.rint(w / scale)), -8, 7)
        assert np.abs(ints - nearest).max() <= 1 and (ints != nearest).any()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input": x_test})[0]
    with torch.no_grad():
        got = build_mirror(q)(torch.from_numpy(x_test)).numpy()
    last = next(n for n in q.graph.node if q.graph.output[0].name in n.output)
    quantum = float(numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == last.input[1])))
    assert np.abs(got - ref).max() <= 2 * quantum * (1 + 1e-6)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    # re-applying the plan (its rounding file beside it) writes the same integers
    again = laqonnx.quantize(path, tmp_path / "again.onnx", plan=res.plan_path, progress=False)
    a, b = _dq_integers(q), _dq_integers(onnx.load(str(again.output)))
    assert all(np.array_equal(a[k][0], b[k][0]) for k in a)
    (tmp_path / "ada.rounding.npz").unlink()
    with pytest.raises(PlanError, match="rounding file .* is missing"):
        laqonnx.quantize(path, tmp_path / "third.onnx", plan=res.plan_path, progress=False)
    assert not (tmp_path / "third.onnx").exists()


def test_auto_rounding_is_a_candidate_the_metric_picks_where_it_pays(cnn, tmp_path):
    path, x_test, x_calib = cnn
    res = laqonnx.quantize(path, tmp_path / "auto.onnx", (x_calib, None), eps=0.1, avg_weight_bits=4, progress=False)
    for lp in res.plan.layers:
        settings = [s.setting for s in lp.scores]
        assert any(s.rounding == "adaptive" for s in settings) and any(s.rounding == "nearest" for s in settings)
        ada = next(s for s in lp.scores if s.setting.rounding == "adaptive")
        base = next(s for s in lp.scores if s.setting == ada.setting.nearest)
        assert ada.cost_bits == base.cost_bits
    nearest = laqonnx.quantize(path, tmp_path / "near.onnx", (x_calib, None), eps=0.1, avg_weight_bits=4, rounding="nearest",
                               progress=False)
    assert all(s.setting.rounding == "nearest" for lp in nearest.plan.layers for s in lp.scores)
    assert res.plan.guard.losses[res.plan.guard.kept] <= nearest.plan.guard.losses[nearest.plan.guard.kept] * 1.05
