"""Adaptive rounding re-fitted in order on the quantized model's inputs: its errors are the real ones
(numpy on onnxruntime's activations), the edited model is what the plan writes, one step from
nearest, kept only where the measured loss does not rise, and recorded in the plan."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import laqonnx
from laqonnx.graph import load_model
from laqonnx.quant.costs import AvgBits
from laqonnx.quant.guard import guard
from laqonnx.quant.lower import lower
from laqonnx.quant.metric import CandidateSpace
from laqonnx.quant.numerics import quantize
from laqonnx.quant.planning import QuantizeOptions, lowering_spec, plan_model
from laqonnx.quant.refit import refit_rounding
from laqonnx.quant.rounding import AdaRoundConfig
from laqonnx.quant.scoring import model_values

torch = pytest.importorskip("torch")

ADA = AdaRoundConfig(iterations=120, sequential=False)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from tests._digits_model import digits_cnn

    _, model, x_test, _, x_calib = digits_cnn()
    path = tmp_path_factory.mktemp("refit") / "cnn.onnx"
    onnx.save(model, str(path))
    pm = load_model(path)
    space = CandidateSpace(weight_bits=(4,), rounding="adaptive", adaround=ADA)
    options = QuantizeOptions(eps=0.1, budget=AvgBits(4), candidates=space, guard=False, calib_limit=128, metric_examples=32)
    return path, pm, plan_model(pm, (x_calib, None), options, progress=False), x_test


def _weights(model: onnx.ModelProto, pm) -> dict[str, tuple[str, np.ndarray]]:
    """layer name -> (activation input, integer weight in the layer's own layout) of every layer the
    lowered graph feeds a dequantized constant weight (a Gemm lowered to MatMul holds it transposed)."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    out = {}
    for layer in pm.layers:
        node = nodes[layer.name]
        dq = producer[node.input[1]]
        assert dq.op_type == "DequantizeLinear"
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int64)
        out[layer.name] = (node.input[0], q if q.shape == tuple(layer.weight_shape) else q.T)
    return out


def test_refit_errors_are_measured_on_the_quantized_inputs_and_the_edit_is_what_the_plan_writes(planned):
    path, pm, p, _ = planned
    data = p.calibration.data
    check = data.pairs(32)
    config = QuantizeOptions(eps=0.1).objective_config()
    done = refit_rounding(pm, p.plan, p.lowered, p.qparams, data, check, config, AdaRoundConfig(iterations=120))
    assert done is not None
    refit, model = done
    assert len(refit.layers) == len(pm.layers)
    # the losses are the guard's on the two models
    losses = {e.name: e.loss for e in guard({"before": p.lowered, "after": model}, pm.model, pm.input_name, pm.output_name,
                                            check, config)}
    # on this model the re-fit pays (0.140 -> 0.117 at 120 iterations): it is kept
    assert refit.kept and refit.loss_sequential < 0.95 * refit.loss_independent
    assert losses["after"] == pytest.approx(refit.loss_sequential, rel=1e-9)
    plan = refit.plan
    assert losses["before"] == pytest.approx(refit.loss_independent, rel=1e-9)
    # the edited model's integers are the plan's, and lowering the plan writes the same ones
    _, spec = lowering_spec(pm, plan, None)
    rewritten, edited = _weights(lower(pm.model, spec), pm), _weights(model, pm)
    assert set(rewritten) == set(edited) == {layer.name for layer in pm.layers}
    for layer in pm.layers:
        q = edited[layer.name][1]
        assert np.array_equal(q, rewritten[layer.name][1])
        assert np.array_equal(q, np.asarray(plan.rounded[layer.weight]).astype(np.int64))
        nearest = quantize(pm.weight(layer), p.qparams[layer.weight]).astype(np.int64)
        assert np.abs(q - nearest).max() <= 1
    # the Gemm's recorded errors, recomputed in numpy: || W_hat a_q - W a_f ||^2 / N, a_q from onnxruntime
    gemm = next(layer for layer in pm.layers if layer.op_type == "Gemm")
    x = data.clean if data.adversarial is None else np.concatenate([data.clean, data.adversarial])
    act = edited[gemm.name][0]
    a_q = model_values(model, pm.input_name, x, [act])[act].astype(np.float64)
    a_f = model_values(pm.model, pm.input_name, x, [gemm.input])[gemm.input].astype(np.float64)
    w = pm.weight(gemm).astype(np.float64)
    qp = p.qparams[gemm.weight]
    scale = np.asarray(qp.scale, np.float64).reshape(-1, 1)
    target = a_f @ w.T
    lp = next(lp for lp in plan.layers if lp.name == gemm.name)
    for q, err in ((quantize(pm.weight(gemm), qp), lp.rounding_error[0]), (edited[gemm.name][1], lp.rounding_error[1])):
        got = a_q @ (q.astype(np.float64) * scale).T
        assert err == pytest.approx(((got - target) ** 2).sum() / len(x), rel=1e-3)
    assert lp.rounding_error[1] <= lp.rounding_error[0]


def test_refit_runs_by_default_and_the_plan_says_so(planned, tmp_path):
    path, pm, p, x_test = planned
    _, _, _, _, x_calib = __import__("tests._digits_model", fromlist=["digits_cnn"]).digits_cnn()
    space = CandidateSpace(weight_bits=(4,), rounding="adaptive", adaround=AdaRoundConfig(iterations=120))
    res = laqonnx.quantize(path, tmp_path / "seq.onnx", (x_calib, None), eps=0.1, avg_weight_bits=4, candidates=space,
                           calib_limit=128, metric_examples=32, progress=False)
    notes = [w for w in res.plan.warnings if "re-fitted in order" in w]
    assert len(notes) == 1 and "calibration loss" in notes[0]
    # the written model holds the plan's integers
    written = _weights(onnx.load(str(res.output)), pm)
    for layer in pm.layers:
        assert np.array_equal(written[layer.name][1], np.asarray(res.plan.rounded[layer.weight]).astype(np.int64))
    # off: no re-fit, no note
    off = laqonnx.quantize(path, tmp_path / "ind.onnx", (x_calib, None), eps=0.1, avg_weight_bits=4,
                           candidates=CandidateSpace(weight_bits=(4,), rounding="adaptive", adaround=ADA),
                           calib_limit=128, metric_examples=32, progress=False)
    assert not any("re-fitted in order" in w for w in off.plan.warnings)


def test_nothing_to_refit_without_adaptive_layers(planned):
    path, pm, p, _ = planned
    import dataclasses

    plan = dataclasses.replace(p.plan, rounded={})
    data = p.calibration.data
    assert refit_rounding(pm, plan, p.lowered, p.qparams, data, data.pairs(8), QuantizeOptions(eps=0.1).objective_config()) is None


def test_a_refit_that_raises_the_measured_loss_is_not_kept(planned, monkeypatch):
    """A re-fit rounding everything away from nearest measures worse: the plan and model stay as they were."""
    import laqonnx.quant.refit as refit_mod
    from laqonnx.quant.rounding import Rounded

    path, pm, p, _ = planned

    def away(layer, w, qp, acts, config, *, target_inputs=None, progress=None):
        nearest = quantize(w, qp).astype(np.int64)
        up = np.clip(nearest + 1, qp.qmin, qp.qmax)
        q = np.where(up != nearest, up, np.clip(nearest - 1, qp.qmin, qp.qmax)).astype(qp.storage_dtype)
        return Rounded(q, 1.0, 1.0, 0)

    monkeypatch.setattr(refit_mod, "adaptive_round", away)
    data = p.calibration.data
    refit, model = refit_rounding(pm, p.plan, p.lowered, p.qparams, data, data.pairs(32), QuantizeOptions(eps=0.1).objective_config())
    assert not refit.kept and refit.loss_sequential > refit.loss_independent
    assert model is p.lowered and refit.plan is p.plan
    assert "not kept" in refit.note()
