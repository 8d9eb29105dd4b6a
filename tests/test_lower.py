"""Lowering writes onnxruntime's own QDQ layout with exactly the planned scales."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from laqonnx.quant.lower import LoweringSpec, lower, ort_baseline, quantized_tensors
from laqonnx.quant.numerics import ActivationQuant, PerChannel, PerTensor, WeightQuant, activation_qparams, weight_qparams
from tests import models

WEIGHTS = {"cnn": ("w1", "w2", "w3"), "residual": ("w0", "wa", "wb", "wf"), "concat": ("wl", "wr", "wm")}
# output-channel axis of each weight (MatMul weights are (in, out): axis 1)
AXIS = {"wm": 1}


def _run(model: onnx.ModelProto, x: np.ndarray, outputs=None) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, {"input": x})


def _minmax_ranges(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[float, float]]:
    names = quantized_tensors(model)
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for t in names:
        if t not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    values = dict(zip([o.name for o in m.graph.output], _run(m, x)))
    return {t: (float(values[t].min()), float(values[t].max())) for t in names}


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _build(name: str) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(getattr(models, name)())


def _ort_ranges(model: onnx.ModelProto, x: np.ndarray, tmp_path) -> dict[str, tuple[float, float]]:
    """onnxruntime's own MinMax calibration (its session fuses ops, so ranges can differ by an ulp
    from an unfused run: to compare bit for bit, both sides use the same ranges)."""
    from onnxruntime.quantization import create_calibrator

    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    cal = create_calibrator(path, [], augmented_model_path=str(tmp_path / "aug.onnx"))
    cal.collect_data(ort_baseline.__globals__["_Reader"]("input", [x[:4], x[4:]]))
    return {k: (float(np.ravel(v.range_value[0])[0]), float(np.ravel(v.range_value[1])[0])) for k, v in cal.compute_data().items()}


@pytest.mark.parametrize("name", ["cnn", "residual", "concat"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_matches_onnxruntime_quantize_static(name, per_channel, tmp_path, monkeypatch):
    """maxabs weights + onnxruntime's min/max ranges through our lowering == its quantize_static
    (both at full int8 range: the baseline's CPU-dependent 7-bit weights are not what is compared)."""
    import laqonnx.quant.lower as lower_mod

    monkeypatch.setattr(lower_mod, "_int8_saturates", lambda: False)
    model = _build(name)
    x = models.random_input(model, n=8, seed=1)
    inits = _inits(model)
    gran = lambda w: PerChannel(AXIS.get(w, 0)) if per_channel else PerTensor()  # noqa: E731
    weights = {w: weight_qparams(inits[w], WeightQuant(8, gran(w))) for w in WEIGHTS[name]}
    ours = lower(model, LoweringSpec(weights=weights, ranges=_ort_ranges(model, x, tmp_path)))
    ref = ort_baseline(model, "input", [x[:4], x[4:]], method="ort-minmax", per_channel=per_channel)
    xt = models.random_input(model, n=6, seed=2)
    np.testing.assert_array_equal(_run(ours, xt)[0], _run(ref, xt)[0])
    onnx.checker.check_model(ours, full_check=True)  # valid ONNX (topologically sorted), not only runnable


@pytest.mark.parametrize("bits,gran,method", [(8, PerChannel(0), "mse"), (4, PerTensor(), "maxabs"), (4, PerChannel(0), "percentile")])
def test_written_scales_are_the_planned_ones(bits, gran, method):
    model = _build("cnn")
    before = model.SerializeToString()
    x = models.random_input(model, n=8)
    inits = _inits(model)
    ranges = _minmax_ranges(model, x)
    weights = {
        "w1": weight_qparams(inits["w1"], WeightQuant(8, PerTensor())),
        "w2": weight_qparams(inits["w2"], WeightQuant(bits, gran, method, percentile=99.0)),
        "w3": weight_qparams(inits["w3"], WeightQuant(8, PerChannel(0))),
    }
    q = lower(model, LoweringSpec(weights=weights, ranges=ranges))
    assert model.SerializeToString() == before  # input untouched
    out = _inits(q)
    for w, qp in weights.items():
        np.testing.assert_array_equal(out[f"{w}_scale"], qp.scale)
        np.testing.assert_array_equal(out[f"{w}_zero_point"].astype(np.int64), qp.zero_point.astype(np.int64))
        expected_type = onnx.TensorProto.INT4 if qp.bits == 4 else onnx.TensorProto.INT8
        init = next(i for i in q.graph.initializer if i.name == f"{w}_quantized")
        assert init.data_type == expected_type
        from laqonnx.quant.numerics import quantize

        np.testing.assert_array_equal(out[f"{w}_quantized"].astype(np.int64), quantize(inits[w], qp).astype(np.int64))
    # the model input's scale is compute_scale_zp of its planned range
    aq = activation_qparams(*ranges["input"], ActivationQuant())
    assert out["input_scale"] == aq.scale and out["input_zero_point"] == aq.zero_point
    if bits == 4:
        assert max(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 21
    y = _run(q, x)[0]
    assert y.shape == (8, 10) and np.isfinite(y).all()


def test_excluded_layer_stays_float_and_16bit_activation():
    model = _build("cnn")
    x = models.random_input(model, n=8)
    inits = _inits(model)
    ranges = _minmax_ranges(model, x)
    weights = {w: weight_qparams(inits[w], WeightQuant()) for w in ("w1", "w3")}
    q = lower(
        model,
        LoweringSpec(weights=weights, ranges=ranges, activations={"f": ActivationQuant(bits=16)}, exclude=("conv2",)),
    )
    out = _inits(q)
    assert "w2_quantized" not in out and "w2" in out
    np.testing.assert_array_equal(out["w2"], inits["w2"])
    assert out["f_zero_point"].dtype == np.uint16
    assert _run(q, x)[0].shape == (8, 10)


def test_bad_range_rejected():
    with pytest.raises(ValueError, match="invalid range"):
        LoweringSpec(weights={}, ranges={"x": (1.0, 0.0)})


def test_constant_node_weight_is_quantized():
    model = onnx.shape_inference.infer_shapes(models.mlp())
    inits = _inits(model)
    # move w1 from an initializer into a Constant node
    w1 = next(i for i in model.graph.initializer if i.name == "w1")
    model.graph.initializer.remove(w1)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["w1"], name="const_w1", value=w1))
    x = models.random_input(model, n=8)
    qp = weight_qparams(inits["w1"], WeightQuant())
    q = lower(model, LoweringSpec(weights={"w1": qp}, ranges=_minmax_ranges(model, x)))
    out = _inits(q)
    np.testing.assert_array_equal(out["w1_scale"], qp.scale)
    assert _run(q, x)[0].shape == (8, 5)
