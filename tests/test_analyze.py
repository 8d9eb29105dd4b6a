"""`laqonnx analyze` and `laqonnx.analyze`: output, JSON schema, weight errors, bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import laqonnx
from laqonnx.cli import main
from laqonnx.graph import load_model
from laqonnx.lipschitz import network_bounds, operator_norm
from tests import models


def _symmetric_error(w: np.ndarray, bits: int, axis: int | None) -> float:
    """Brute-force symmetric max-abs quantization, round half to even, as ONNX QuantizeLinear."""
    qmax = 2 ** (bits - 1) - 1
    w = w.astype(np.float32)
    if axis is None:
        scale = np.float32(np.abs(w).max() / qmax)
    else:
        other = tuple(i for i in range(w.ndim) if i != axis)
        shape = [1] * w.ndim
        shape[axis] = -1
        scale = (np.abs(w).max(axis=other) / np.float32(qmax)).astype(np.float32).reshape(shape)
    q = np.clip(np.rint(w / scale), -qmax - 1, qmax)
    deq = (q * scale).astype(np.float64)
    return float(np.linalg.norm(w.astype(np.float64) - deq) / np.linalg.norm(w.astype(np.float64)))


def test_python_api_values_and_json():
    model = models.residual()
    a = laqonnx.analyze(model, progress=False)
    assert isinstance(a, laqonnx.Analysis)
    pm = load_model(model)
    norms = {x.name: operator_norm(x, pm.weight(x)).value for x in pm.layers}
    assert [x.name for x in a.layers] == ["stem", "conv_a", "conv_b", "fc"]
    for x in a.layers:
        assert x.lipschitz == pytest.approx(norms[x.name], rel=1e-9)
        layer = pm.layer(x.name)
        w = pm.weight(layer)
        e = x.weight_error
        assert e.int8_per_tensor == pytest.approx(_symmetric_error(w, 8, None), rel=1e-4)
        assert e.int8_per_channel == pytest.approx(_symmetric_error(w, 8, layer.channel_axis), rel=1e-4)
        assert e.int4_per_tensor == pytest.approx(_symmetric_error(w, 4, None), rel=1e-4)
        assert e.int4_per_channel == pytest.approx(_symmetric_error(w, 4, layer.channel_axis), rel=1e-4)
    assert a.network_bound == pytest.approx(network_bounds(pm, norms).network_bound, rel=1e-9)
    doc = json.loads(json.dumps(a.to_json()))
    assert doc["model"] is None and doc["network_bound"] == pytest.approx(a.network_bound)
    assert doc["unknown_ops"] == []
    for key in ("name", "op_type", "weight", "weight_shape", "input_shape", "lipschitz", "lipschitz_method"):
        assert key in doc["layers"][0]
    assert doc["layers"][1]["weight_shape"] == [4, 4, 3, 3] and doc["layers"][1]["input_shape"] == [1, 4, 6, 6]


def test_cli_table_and_json(tmp_path, capsys):
    path = tmp_path / "cnn.onnx"
    onnx.save(models.cnn(bn=True), str(path))
    out = tmp_path / "a.json"
    assert main(["analyze", str(path), "--json", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["model"] == str(path)
    assert [x["name"] for x in doc["layers"]] == ["conv1", "conv2", "fc"]
    assert [x["op_type"] for x in doc["layers"]] == ["Conv", "Conv", "Gemm"]
    assert doc["layers"][2]["weight_shape"] == [10, 256]
    assert isinstance(doc["network_bound"], float) and doc["unknown_ops"] == []
    assert "Lipschitz" in stdout and "conv2" in stdout and "network Lipschitz bound" in stdout
    assert f"{doc['network_bound']:.4g}" in stdout


def test_unknown_op_is_a_warning_and_null_bound(tmp_path, capsys):
    model = models.cnn()
    for node in model.graph.node:
        if node.name == "relu2":
            node.op_type = "Hardmax"
    path = tmp_path / "hardmax.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "a.json"
    assert main(["analyze", str(path), "--json", str(out), "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    assert doc["network_bound"] is None and doc["unknown_ops"] == ["relu2 (Hardmax)"]
    assert any("relu2 (Hardmax)" in w for w in doc["warnings"])
    stdout = capsys.readouterr().out
    assert "network Lipschitz bound (input 1,1,8,8 -> output, L2): unknown" in stdout


def _dynamic(tmp_path):
    model = models.cnn()
    for axis, name in ((2, "H"), (3, "W")):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    path = tmp_path / "dyn.onnx"
    onnx.save(model, str(path))
    return path


def _bad(tmp_path, kind):
    path = tmp_path / "m.onnx"
    if kind == "missing":
        return [str(path)], "model file not found"
    if kind == "not-onnx":
        path.write_text("hello, I am a text file\n")
        return [str(path)], "not"
    if kind == "truncated":
        data = models.cnn().SerializeToString()
        path.write_bytes(data[: len(data) * 2 // 3])
        return [str(path)], "not"
    if kind == "no-weighted-layers":
        graph = helper.make_graph([helper.make_node("Relu", ["input"], ["y"], name="r")], "g",
                                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return [str(path)], "no weighted layers"
    if kind == "dynamic-without-shape":
        return [str(_dynamic(tmp_path))], "dynamic size 'H' on axis 2: pass an input shape (--input-shape)"
    if kind == "dynamic-wrong-size":
        return [str(_dynamic(tmp_path)), "--input-shape", "1,1,16,16"], "does not fit the model"
    if kind == "contradicting-shape":
        onnx.save(models.cnn(), str(path))
        return [str(path), "--input-shape", "1,3,8,8"], "axis 1 is 3, the model says 1"
    if kind == "json-over-input":
        onnx.save(models.cnn(), str(path))
        return [str(path), "--json", str(path)], "refusing to overwrite the input"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "not-onnx", "truncated", "no-weighted-layers", "dynamic-without-shape",
                                  "dynamic-wrong-size", "contradicting-shape", "json-over-input"])
def test_bad_input_is_one_line_error(tmp_path, capsys, kind):
    args, needle = _bad(tmp_path, kind)
    code = main(["analyze", *args, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("laqonnx analyze: error: ") and needle in lines[0]
    assert "Traceback" not in err


def test_bad_shape_argument_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "m.onnx", "--input-shape", "1,a,3"])
    assert exc.value.code == 2
    assert "not a shape" in capsys.readouterr().err


def test_dynamic_model_with_input_shape(tmp_path):
    path = _dynamic(tmp_path)
    a = laqonnx.analyze(path, input_shape=(1, 1, 8, 8), progress=False)
    ref = laqonnx.analyze(models.cnn(), progress=False)
    assert [x.lipschitz for x in a.layers] == pytest.approx([x.lipschitz for x in ref.layers], rel=1e-9)


def test_help_describes_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    text = capsys.readouterr().out
    assert "--input-shape" in text and "--json" in text and "operator norm" in text


def test_weight_from_numpy_helper_roundtrip():
    # a Gemm without transB: channels on axis 1
    g = np.random.default_rng(0)
    w = g.normal(size=(6, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["input", "w"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              initializer=[numpy_helper.from_array(w, "w")])
    a = laqonnx.analyze(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), progress=False)
    (layer,) = a.layers
    assert layer.lipschitz == pytest.approx(np.linalg.norm(w, 2), rel=1e-6)
    assert layer.weight_error.int8_per_channel == pytest.approx(_symmetric_error(w, 8, 1), rel=1e-4)
    assert a.network_bound == pytest.approx(layer.lipschitz)


# ---- quantized (QDQ) models -------------------------------------------------------------------


def _explicit_norm(float_model: onnx.ModelProto, layer, w: np.ndarray) -> float:
    """Largest singular value of the layer's explicit matrix: onnxruntime applied to every basis input."""
    import onnxruntime as ort

    if layer.op_type in ("Gemm", "MatMul"):  # int4 Gemm weights are written as MatMul (MatMulNBits form)
        return float(np.linalg.svd(w.astype(np.float64), compute_uv=False)[0])
    node = next(n for n in float_model.graph.node if n.name == layer.name)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="c")
    conv.attribute.extend(node.attribute)
    shape = layer.input_shape[1:]
    graph = helper.make_graph([conv], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w.astype(np.float32), "w")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    n = int(np.prod(shape))
    basis = np.eye(n, dtype=np.float32).reshape(n, *shape)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": basis})[0]
    return float(np.linalg.svd(y.reshape(n, -1).astype(np.float64), compute_uv=False)[0])


def _check_quantized_analysis(float_model, qdq, bits: list[int]) -> dict:
    from tests.test_graph import dequantized_constants

    fa = laqonnx.analyze(float_model, progress=False)
    qa = laqonnx.analyze(qdq, progress=False)
    assert [x.name for x in qa.layers] == [x.name for x in fa.layers]
    assert qa.quantized and not fa.quantized
    consts = dequantized_constants(qdq if isinstance(qdq, onnx.ModelProto) else onnx.load(str(qdq)))
    for x in qa.layers:
        w, _ = consts[x.weight]
        assert x.lipschitz == pytest.approx(_explicit_norm(float_model, x, w), rel=1e-5)  # exact methods here
        assert x.lipschitz_method in ("svd", "spectral")
    # the comparison above can tell the dequantized weight from the float one
    assert max(abs(q.lipschitz / f.lipschitz - 1) for q, f in zip(qa.layers, fa.layers)) > 1e-4
    assert [x.weight_bits for x in qa.layers] == bits
    assert all(x.weight_bits is None for x in fa.layers)
    doc = json.loads(json.dumps(qa.to_json()))
    assert [x["weight_bits"] for x in doc["layers"]] == bits and doc["quantized"] is True
    assert all(x["weight_bits"] is None and x["weight_granularity"] is None for x in fa.to_json()["layers"])
    assert qa.network_bound is not None and qa.unknown_ops == ()
    return doc


@pytest.mark.parametrize("builder", ["cnn", "residual"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_ort_quantized_model_lipschitz_is_the_dequantized_operator_norm(builder, per_channel, tmp_path):
    from tests.test_graph import ort_qdq

    float_model = getattr(models, builder)()
    qdq = ort_qdq(float_model, per_channel, tmp_path)
    doc = _check_quantized_analysis(float_model, qdq, [8] * len(load_model(float_model).layers))
    gran = "per_channel" if per_channel else "per_tensor"
    assert {x["weight_granularity"] for x in doc["layers"]} == {gran}
    assert any(w.startswith("activation quantization treated as identity") for w in doc["warnings"])


def test_int4_weight_only_opset21_lipschitz():
    from tests.test_graph import _weight_only_qdq

    qdq, _ = _weight_only_qdq(models.cnn(), TensorProto.INT4, "", 21)
    doc = _check_quantized_analysis(models.cnn(), qdq, [4, 4, 4])
    assert not any("activation quantization" in w for w in doc["warnings"])


def _calib(model: onnx.ModelProto, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    return models.random_input(model, n, seed=3), np.arange(n) % 10


@pytest.mark.parametrize("avg_bits", [None, 6.0])
def test_laqonnx_quantized_model_analyzes(avg_bits, tmp_path):
    float_model = models.cnn()
    out = tmp_path / "cnn.int8.onnx"
    res = laqonnx.quantize(float_model, out, _calib(float_model), avg_weight_bits=avg_bits, progress=False)
    planned = {lp.name: lp.chosen.weight.bits for lp in res.plan.layers if lp.chosen.weight is not None}
    qa = laqonnx.analyze(out, progress=False)
    expected = [x.weight_bits for x in qa.layers]
    assert {x.name: x.weight_bits for x in qa.layers if x.weight_bits is not None} == planned
    assert set(expected) <= {4, 8} and (avg_bits is None) == (4 not in expected)
    _check_quantized_analysis(float_model, out, expected)


def test_cli_analyze_table_shows_bits_and_quantize_refuses_qdq(tmp_path, capsys):
    from tests.test_graph import ort_qdq

    qdq = ort_qdq(models.cnn(), True, tmp_path)
    path = tmp_path / "cnn.qdq.onnx"
    onnx.save(qdq, str(path))
    assert main(["analyze", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0].split()
    assert head[:5] == ["layer", "op", "weight", "shape", "bits"]
    assert [line.split()[3:5] for line in out.splitlines()[2:5]] == [["8", "C"]] * 3
    assert "warning: activation quantization treated as identity" in out
    x, y = _calib(models.cnn())
    np.savez(tmp_path / "calib.npz", x=x, y=y)
    before = path.read_bytes()
    code = main(["quantize", str(path), "-o", str(tmp_path / "again.onnx"), "--calib", str(tmp_path / "calib.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "already quantized" in err
    assert not (tmp_path / "again.onnx").exists() and path.read_bytes() == before


def test_report_analyses_include_the_quantized_model(tmp_path):
    from laqonnx.robustness.evaluate import _analyses
    from tests.test_graph import ort_qdq

    float_model = models.cnn()
    qdq = ort_qdq(float_model, False, tmp_path)
    from types import SimpleNamespace

    evs = [SimpleNamespace(path=name, input_shape=(1, 8, 8)) for name in ("float", "int8")]
    out = _analyses([float_model, qdq], evs)
    assert set(out) == {"float", "int8"}
    assert [x["name"] for x in out["int8"]["layers"]] == [x["name"] for x in out["float"]["layers"]]
    assert [x["weight_bits"] for x in out["int8"]["layers"]] == [8, 8, 8]
