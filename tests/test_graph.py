"""Graph stage: loading, BN folding, shape inference, the weighted-layer walk, bad models."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from laqonnx.errors import ModelError
from laqonnx.graph import load_model
from tests import models


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_batchnorm_folding_matches_onnxruntime_on_the_unfolded_model():
    model = models.cnn(bn=True)
    pm = load_model(model)
    assert [n.op_type for n in pm.model.graph.node].count("BatchNormalization") == 0
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 1  # input untouched
    x = models.random_input(model, n=5, seed=3)
    np.testing.assert_allclose(_run(pm.model, x), _run(model, x), rtol=1e-5, atol=1e-5)
    conv1 = pm.layer("conv1")
    assert conv1.output == "bn1" and conv1.bias is not None
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scale, var, w = arrays["bn_s"], arrays["bn_v"], arrays["w1"]
    expected = w * (scale / np.sqrt(var + 1e-5))[:, None, None, None]
    np.testing.assert_allclose(pm.weight(conv1), expected, rtol=1e-6)


def test_layers_of_cnn():
    pm = load_model(models.cnn())
    assert pm.input_name == "input" and pm.output_name == "logits" and pm.input_shape == (1, 1, 8, 8)
    got = [(x.name, x.op_type, x.weight, x.weight_shape, x.input_shape, x.output_shape, x.channel_axis, x.index) for x in pm.layers]
    assert got == [
        ("conv1", "Conv", "w1", (8, 1, 3, 3), (1, 1, 8, 8), (1, 8, 8, 8), 0, 0),
        ("conv2", "Conv", "w2", (16, 8, 3, 3), (1, 8, 8, 8), (1, 16, 4, 4), 0, 2),
        ("fc", "Gemm", "w3", (10, 256), (1, 256), (1, 10), 0, 5),
    ]
    assert pm.layer("conv2").attrs["strides"] == (2, 2) and pm.layer("conv2").attrs["pads"] == (1, 1, 1, 1)
    assert pm.layer("fc").attrs["transB"] == 1
    assert pm.skipped == ()


def _graph_model(nodes, inits, in_dims, out_rank=2, opset=17, out_name="y"):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_dims)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [f"d{i}" for i in range(out_rank)])],
        initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_unnamed_nodes_get_unique_names_and_matmul_two_activations_is_skipped():
    g = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["a"]),
        helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["a", "at"], ["y"]),
    ]
    model = _graph_model(nodes, {"w": g.normal(size=(4, 3))}, ["N", 5, 4], out_rank=3)
    pm = load_model(model)
    names = [n.name for n in pm.model.graph.node]
    assert names == ["MatMul_0", "Transpose_1", "MatMul_2"]
    assert [x.name for x in pm.layers] == ["MatMul_0"] and pm.layers[0].input_shape == (1, 5, 4)
    assert [(s.name, s.op_type) for s in pm.skipped] == [("MatMul_2", "MatMul")]
    assert "two activations" in pm.skipped[0].reason


@pytest.mark.parametrize("size,auto_pad,expected", [
    (8, "SAME_UPPER", (0, 0, 1, 1)),
    (8, "SAME_LOWER", (1, 1, 0, 0)),
    (7, "SAME_UPPER", (1, 1, 1, 1)),
    (7, "VALID", (0, 0, 0, 0)),
])
def test_auto_pad_is_resolved_to_explicit_pads(size, auto_pad, expected):
    model = _graph_model(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", auto_pad=auto_pad, strides=[2, 2]),
         helper.make_node("Flatten", ["c"], ["y"], name="flat")],
        {"w": np.ones((2, 1, 3, 3))}, ["N", 1, size, size])
    layer = load_model(model).layers[0]
    assert layer.attrs["pads"] == expected
    out = _run(model, np.zeros((1, 1, size, size), np.float32))
    assert layer.output_shape[1:] == (2, *[(size - 3 + expected[0] + expected[2]) // 2 + 1] * 2)
    assert out.shape[1] == int(np.prod(layer.output_shape[1:]))


def _dynamic_spatial():
    return _graph_model(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
         helper.make_node("Flatten", ["p"], ["y"], name="flat")],
        {"w": np.ones((2, 3, 3, 3))}, ["N", 3, "H", "W"])


def test_dynamic_spatial_size_needs_an_input_shape():
    with pytest.raises(ModelError, match="dynamic size 'H' on axis 2"):
        load_model(_dynamic_spatial())
    pm = load_model(_dynamic_spatial(), input_shape=(1, 3, 10, 12))
    assert pm.input_shape == (1, 3, 10, 12) and pm.layers[0].input_shape == (1, 3, 10, 12)
    assert pm.layers[0].output_shape == (1, 2, 10, 12)


@pytest.mark.parametrize("shape,match", [
    ((1, 4, 8, 8), "axis 1 is 4, the model says 1"),
    ((1, 1, 8), "rank 3"),
    ((1, 1, 0, 8), "non-positive"),
])
def test_contradicting_input_shape(shape, match):
    with pytest.raises(ModelError, match=match):
        load_model(models.cnn(), input_shape=shape)


def test_input_shape_inconsistent_downstream():
    # fixed-size Gemm after Flatten: 16x16 input gives the wrong feature count
    model = models.cnn()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    with pytest.raises(ModelError, match="does not fit the model"):
        load_model(model, input_shape=(1, 1, 16, 16))


def test_external_data_loads(tmp_path):
    model = models.cnn(seed=4)
    expected = numpy_helper.to_array([t for t in model.graph.initializer if t.name == "w2"][0])
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    pm = load_model(path)
    assert pm.source == str(path)
    np.testing.assert_array_equal(pm.weight("conv2"), expected)


@pytest.mark.parametrize("kind", ["missing", "folder", "text", "truncated", "no-weights"])
def test_bad_files(tmp_path, kind):
    path = tmp_path / "m.onnx"
    if kind == "text":
        path.write_text("this is not a model\n" * 20)
    elif kind == "truncated":
        data = models.cnn().SerializeToString()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "folder":
        path.mkdir()
    elif kind == "no-weights":
        onnx.save(_graph_model([helper.make_node("Relu", ["input"], ["y"], name="r")], {}, ["N", 4]), str(path))
    match = {"missing": "not found", "folder": "folder", "text": "not", "truncated": "not",
             "no-weights": "no weighted layers"}[kind]
    with pytest.raises(ModelError, match=match):
        load_model(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_export_with_batchnorm_and_identity_params_is_folded():
    torch = pytest.importorskip("torch")
    import io

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    buf = io.BytesIO()
    torch.onnx.export(net, torch.rand(1, 3, 6, 6), buf, dynamo=False, input_names=["input"], output_names=["y"],
                      dynamic_axes={"input": {0: "N"}}, training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    model = onnx.load_from_string(buf.getvalue())
    assert "BatchNormalization" in [n.op_type for n in model.graph.node]
    pm = load_model(model)
    assert "BatchNormalization" not in [n.op_type for n in pm.model.graph.node]
    x = np.random.default_rng(0).uniform(0, 1, (3, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(pm.model, x), _run(model, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run(pm.model, x), net(torch.tensor(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


# ---- quantized (QDQ) models: read as their dequantized float equivalent -------------------------


def ort_qdq(model: onnx.ModelProto, per_channel: bool, tmp_path) -> onnx.ModelProto:
    """``model`` quantized by onnxruntime's own ``quantize_static`` (QDQ, int8 weights, uint8 activations)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    x = models.random_input(model, 8)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x[i : i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.it, None)

    src, dst = tmp_path / f"f{per_channel}.onnx", tmp_path / f"q{per_channel}.onnx"
    onnx.save(model, str(src))
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return onnx.load(str(dst))


def dequantized_constants(qdq: onnx.ModelProto) -> dict[str, tuple[np.ndarray, onnx.TensorProto]]:
    """Independent numpy reading of every DequantizeLinear of initializers: output -> ((x - zp) * scale, x)."""
    inits = {t.name: t for t in qdq.graph.initializer}
    out = {}
    for node in qdq.graph.node:
        if node.op_type != "DequantizeLinear" or not all(n in inits for n in node.input if n):
            continue
        x = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.int64) if len(node.input) > 2 else np.zeros_like(x[:0])
        if scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape) if zp.size else 0
        elif zp.size == 0:
            zp = 0
        out[node.output[0]] = (((x - zp).astype(np.float32) * scale.reshape(scale.shape if scale.size > 1 else ())).astype(np.float32),
                               inits[node.input[0]])
    return out


@pytest.mark.parametrize("builder", ["cnn", "residual"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_ort_qdq_model_reads_as_dequantized_float(builder, per_channel, tmp_path):
    float_model = getattr(models, builder)()
    qdq = ort_qdq(float_model, per_channel, tmp_path)
    ref = load_model(float_model)
    pm = load_model(qdq)
    assert [x.name for x in pm.layers] == [x.name for x in ref.layers]
    assert [x.weight_shape for x in pm.layers] == [x.weight_shape for x in ref.layers]
    assert pm.quantized and not ref.quantized and pm.activation_qdq_pairs > 0 and not pm.skipped
    consts = dequantized_constants(qdq)
    for layer, fl in zip(pm.layers, ref.layers):
        expected, stored = consts[layer.weight]
        assert stored.data_type == TensorProto.INT8
        assert layer.weight_bits == 8 and layer.weight_quantized and not fl.weight_quantized
        assert layer.weight_qparams.per_channel == per_channel
        np.testing.assert_array_equal(pm.weight(layer), expected)  # exactly ONNX's dequantization
        assert np.abs(pm.weight(layer) - ref.weight(fl)).max() > 0  # really the quantized weight
        assert layer.input_shape == fl.input_shape and layer.attrs == fl.attrs
    ops = {n.op_type for n in pm.model.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    with pytest.raises(ModelError, match="already quantized"):
        load_model(qdq, allow_quantized=False)
    load_model(float_model, allow_quantized=False)


def _weight_only_qdq(model: onnx.ModelProto, etype: int, domain: str, opset: int) -> tuple[onnx.ModelProto, dict]:
    """``model`` with every weight stored as ``etype`` per output channel behind a DequantizeLinear (no activation QDQ)."""
    from laqonnx.quant.numerics import QParams, quantize

    bits, signed = {TensorProto.INT4: (4, True), TensorProto.UINT4: (4, False), TensorProto.INT8: (8, True),
                    TensorProto.UINT8: (8, False), TensorProto.INT16: (16, True)}[etype]
    m = copy.deepcopy(model)  # Conv, Relu, Flatten and Gemm are unchanged from opset 13 to 21
    m.opset_import[0].version = opset
    m.ir_version = 10 if opset >= 21 else 8
    g = m.graph
    weights = {n.input[1] for n in g.node if n.op_type in ("Conv", "Gemm")}
    rng = np.random.default_rng(1)
    expected = {}
    for t in list(g.initializer):
        if t.name not in weights:
            continue
        w = numpy_helper.to_array(t)
        qmax = 2 ** (bits - 1) - 1
        zp = rng.integers(-1, 2, w.shape[0]) if signed else rng.integers(qmax - 1, qmax + 2, w.shape[0])
        scale = (np.abs(w).reshape(w.shape[0], -1).max(1) / (qmax - 1)).astype(np.float32)
        qp = QParams(scale=scale, zero_point=zp, bits=bits, signed=signed, axis=0)
        q = quantize(w, qp).astype(np.int64)
        shape = (-1,) + (1,) * (w.ndim - 1)
        expected[f"{t.name}_dq"] = ((q - zp.reshape(shape)).astype(np.float32) * scale.reshape(shape)).astype(np.float32)
        g.initializer.remove(t)
        g.initializer.extend([
            helper.make_tensor(f"{t.name}_q", etype, w.shape, q.ravel().tolist()),
            numpy_helper.from_array(scale, f"{t.name}_scale"),
            helper.make_tensor(f"{t.name}_zp", etype, [w.shape[0]], zp.tolist()),
        ])
        g.node.insert(0, helper.make_node("DequantizeLinear", [f"{t.name}_q", f"{t.name}_scale", f"{t.name}_zp"],
                                          [f"{t.name}_dq"], name=f"{t.name}_DQ", axis=0, domain=domain))
        for n in g.node:
            for i, name in enumerate(n.input):
                if name == t.name and n.op_type != "DequantizeLinear":
                    n.input[i] = f"{t.name}_dq"
    if domain:
        m.opset_import.append(helper.make_opsetid(domain, 1))
    onnx.checker.check_model(m)
    return m, expected


@pytest.mark.parametrize(
    "etype,domain,opset",
    [(TensorProto.INT4, "", 21), (TensorProto.UINT4, "", 21), (TensorProto.INT16, "", 21),
     (TensorProto.UINT8, "", 13), (TensorProto.INT8, "com.microsoft", 17)],
)
def test_weight_only_qdq_matches_onnxruntime(etype, domain, opset):
    import onnxruntime as ort

    qdq, expected = _weight_only_qdq(models.cnn(), etype, domain, opset)
    pm = load_model(qdq)
    bits = 4 if etype in (TensorProto.INT4, TensorProto.UINT4) else 16 if etype == TensorProto.INT16 else 8
    assert [x.name for x in pm.layers] == ["conv1", "conv2", "fc"]
    assert [x.weight_bits for x in pm.layers] == [bits] * 3 and pm.activation_qdq_pairs == 0
    for layer in pm.layers:
        np.testing.assert_array_equal(pm.weight(layer), expected[layer.weight])
    x = models.random_input(qdq, 3)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(pm.model), run(qdq), rtol=1e-5, atol=1e-5)
