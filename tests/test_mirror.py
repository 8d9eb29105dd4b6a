"""The torch mirror reproduces onnxruntime on float and QDQ graphs, and its gradients flow.

Tolerances: float graphs max |mirror - ORT| <= 1e-5 * max(1, max |ORT logit|); QDQ graphs of
tests.models: max |mirror - ORT| <= 1e-4 * max |ORT logit| (observed exactly 0, against onnxruntime
with and without its fused int8 kernels) and identical argmax; deeper QDQ graphs (zoo ResNet /
MobileNet): at most 2 output quanta on at most 2 % of examples, argmax agreement >= 99 % (float
accumulation order can flip a value that sits on a rounding boundary).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from laqonnx.errors import ModelError
from laqonnx.robustness.mirror import build_mirror, fake_quantize, mirror_classifier, supported_ops
from laqonnx.robustness.ort_estimator import OrtModel, logits_model
from tests import models as M
from tests._digits_model import export, quantize


def _ort(model: onnx.ModelProto, x: np.ndarray, optimized: bool = True) -> np.ndarray:
    return OrtModel(model, optimized=optimized).predict(x)


def _mirror(model: onnx.ModelProto, x: np.ndarray, **kw) -> np.ndarray:
    with torch.no_grad():
        return build_mirror(model, **kw)(torch.from_numpy(x)).numpy()


def _single(nodes, inits, in_shape, opset: int = 17, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[i if isinstance(i, onnx.TensorProto) else numpy_helper.from_array(i[1], i[0]) for i in inits])
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=ops)
    model.ir_version = 8 if opset < 21 else 10
    return model


def _f(*shape, seed=0, scale=0.5):
    return np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32)


def _i64(*v):
    return np.array(v, dtype=np.int64)


N = helper.make_node
OP_MODELS = {
    "conv1d_dil_groups_asym": (
        [N("Conv", ["input", "w", "b"], ["logits"], group=2, dilations=[2], pads=[1, 3], strides=[2])],
        [("w", _f(4, 1, 3)), ("b", _f(4))], [2, 11]),
    "conv2d_same_upper": ([N("Conv", ["input", "w"], ["logits"], auto_pad="SAME_UPPER", strides=[2, 2])],
                          [("w", _f(3, 2, 4, 4))], [2, 7, 7]),
    "conv2d_same_lower_valid": (
        [N("Conv", ["input", "w"], ["c"], auto_pad="SAME_LOWER", strides=[2, 1]),
         N("Conv", ["c", "w2"], ["logits"], auto_pad="VALID")],
        [("w", _f(3, 2, 2, 2)), ("w2", _f(2, 3, 2, 3, seed=1))], [2, 7, 6]),
    "conv_transpose": ([N("ConvTranspose", ["input", "w", "b"], ["logits"], strides=[2, 2], pads=[1, 0, 0, 1],
                          output_padding=[1, 0])], [("w", _f(2, 3, 3, 3)), ("b", _f(3))], [2, 4, 5]),
    "conv_transpose_same": ([N("ConvTranspose", ["input", "w"], ["logits"], strides=[2, 2], auto_pad="SAME_UPPER",
                               group=2)], [("w", _f(4, 1, 3, 3))], [4, 3, 3]),
    "gemm_alpha_beta_transA": (
        [N("Transpose", ["input"], ["t"], perm=[1, 0]),
         N("Gemm", ["t", "w", "c"], ["logits"], alpha=0.5, beta=2.0, transA=1)],
        [("w", _f(6, 4)), ("c", _f(1, 4))], [6]),
    "matmul_arith": (
        [N("MatMul", ["input", "w"], ["m"]), N("Sub", ["m", "c"], ["s"]), N("Mul", ["s", "c"], ["p"]),
         N("Div", ["p", "d"], ["q"]), N("Add", ["q", "input"], ["logits"])],
        [("w", _f(5, 5)), ("c", _f(5)), ("d", np.full(5, 1.5, np.float32))], [3, 5]),
    "activations": (
        [N("LeakyRelu", ["input"], ["a"], alpha=0.2), N("Sigmoid", ["a"], ["b"]), N("Tanh", ["input"], ["c"]),
         N("Clip", ["c", "lo", "hi"], ["d"]), N("Add", ["b", "d"], ["e"]), N("Relu", ["e"], ["f"]),
         N("Softmax", ["f"], ["g"], axis=1), N("LogSoftmax", ["e"], ["h"], axis=2), N("Add", ["g", "h"], ["logits"])],
        [("lo", np.array(-0.3, np.float32)), ("hi", np.array(0.6, np.float32))], [3, 4]),
    "pools": (
        [N("MaxPool", ["input"], ["a"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1], ceil_mode=0),
         N("AveragePool", ["input"], ["b"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1]),
         N("AveragePool", ["input"], ["c"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
           count_include_pad=1),
         N("GlobalAveragePool", ["c"], ["d"]), N("GlobalMaxPool", ["a"], ["e"]),
         N("Add", ["a", "b"], ["ab"]), N("Flatten", ["ab"], ["f"], axis=1), N("Flatten", ["d"], ["g"], axis=1),
         N("Flatten", ["e"], ["h"], axis=1), N("Concat", ["f", "g", "h"], ["logits"], axis=1)], [], [2, 7, 7]),
    "pad_shapes": (
        [N("Pad", ["input", "pads", "cv"], ["a"], mode="constant"),
         N("Pad", ["input", "pads2"], ["b"], mode="reflect"), N("Pad", ["input", "pads2"], ["c"], mode="edge"),
         N("Add", ["b", "c"], ["bc"]), N("Reshape", ["bc", "shape"], ["r"]), N("Unsqueeze", ["r", "ax"], ["u"]),
         N("Squeeze", ["u", "ax"], ["s"]), N("Flatten", ["a"], ["fa"], axis=1),
         N("Concat", ["s", "fa"], ["cat"], axis=1), N("Dropout", ["cat"], ["dr"]), N("Identity", ["dr"], ["logits"])],
        [("pads", _i64(0, 0, 1, 2, 0, 0, 2, 0)), ("cv", np.array(0.7, np.float32)),
         ("pads2", _i64(0, 0, 1, 1, 0, 0, 1, 2)), ("shape", _i64(0, -1)), ("ax", _i64(1))], [2, 4, 5]),
    "constant_slice_gather_cast": (
        [N("Constant", [], ["k"], value=numpy_helper.from_array(_f(6, seed=3))),
         N("Mul", ["input", "k"], ["m"]), N("Shape", ["m"], ["sh"]), N("Gather", ["sh", "i0"], ["n"], axis=0),
         N("Slice", ["m", "st", "en", "axs", "stp"], ["sl"]), N("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
         N("ReduceMean", ["sl"], ["rm"], axes=[1], keepdims=1), N("Add", ["sl", "rm"], ["a"]),
         N("Mul", ["a", "nf"], ["logits"])],
        [("i0", _i64(0)), ("st", _i64(1)), ("en", _i64(-1)), ("axs", _i64(1)), ("stp", _i64(2))], [6]),
}


@pytest.mark.parametrize("name", sorted(OP_MODELS))
def test_op_graphs_match_onnxruntime(name: str) -> None:
    nodes, inits, shape = OP_MODELS[name]
    model = _single(nodes, inits, shape)
    x = M.random_input(tuple(shape), n=5, seed=1)
    ref = _ort(model, x)
    got = _mirror(model, x).reshape(len(x), -1)  # OrtModel returns (N, -1) logits
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("opset", [10, 11])
def test_opset_dependent_attribute_forms(opset: int) -> None:
    """Clip's min/max (attributes before opset 11) and Softmax's 2-D coercion before opset 13."""
    clip = N("Clip", ["input"], ["c"], min=-0.2, max=0.4) if opset < 11 else N("Clip", ["input", "lo"], ["c"])
    inits = [] if opset < 11 else [("lo", np.array(0.25, np.float32))]
    # Neg: not a final Softmax (behind an Identity it would count as final and be stripped, as keras2onnx writes it)
    nodes = [clip, N("Softmax", ["c"], ["s"], axis=1), N("Neg", ["s"], ["logits"])]
    model = _single(nodes, inits, [3, 4], opset=opset)
    x = _f(4, 3, 4, seed=2, scale=1.0)
    np.testing.assert_allclose(_mirror(model, x).reshape(4, -1), _ort(model, x), atol=1e-6)


@pytest.mark.parametrize("builder", [M.cnn, lambda: M.cnn(bn=True), M.residual, M.concat])
def test_float_models_match(builder) -> None:
    model = builder()
    x = M.random_input(model, n=32, seed=3)
    ref, got = _ort(model, x), _mirror(model, x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))
    assert (got.argmax(1) == ref.argmax(1)).all()


class _ViewNet(torch.nn.Module):
    """Exports Shape/Gather/Unsqueeze/Concat/Reshape (x.view(x.size(0), -1)), MaxPool, ReLU6 (Clip)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.max_pool2d(torch.nn.functional.relu6(self.bn(self.conv(x))), 2)
        return self.fc(h.view(h.size(0), -1))


def test_torch_exported_model_with_shape_ops_matches() -> None:
    model = export(_ViewNet().eval(), torch.zeros(1, 1, 8, 8))
    ops = {n.op_type for n in model.graph.node}
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Clip", "Constant"} <= ops
    x = M.random_input((1, 8, 8), n=6, seed=4)
    np.testing.assert_allclose(_mirror(model, x), _ort(model, x), atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(_mirror(model, x), _ViewNet().eval()(torch.from_numpy(x)).numpy(), atol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("activation", ["QUInt8", "QInt8"])
@pytest.mark.parametrize("builder", [M.cnn, M.residual], ids=["cnn", "residual"])
def test_qdq_models_match_onnxruntime(builder, activation: str, per_channel: bool) -> None:
    model = builder()
    qdq = quantize(model, M.random_input(model, n=16, seed=5), per_channel=per_channel, activation=activation)
    assert any(n.op_type == "QuantizeLinear" for n in qdq.graph.node)
    inits = {t.name: t for t in qdq.graph.initializer}
    vector_scales = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits
                     and len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1]
    assert bool(vector_scales) == per_channel
    x = M.random_input(model, n=64, seed=6)
    got = _mirror(qdq, x)
    for optimized in (False, True):  # Q/DQ run as separate ops, and fused into int8 kernels
        ref = _ort(qdq, x, optimized=optimized)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
        assert (got.argmax(1) == ref.argmax(1)).all()
    # the quantized model really differs from the float one (the fake-quant is not a no-op)
    assert np.abs(got - _ort(model, x)).max() > 0


QTYPES = [(TensorProto.INT8, np.int8, 17), (TensorProto.UINT8, np.uint8, 17), (TensorProto.INT16, np.int16, 21),
          (TensorProto.UINT16, np.uint16, 21), (TensorProto.INT4, None, 21), (TensorProto.UINT4, None, 21)]


@pytest.mark.parametrize("per_axis", [False, True])
@pytest.mark.parametrize("qtype,np_type,opset", QTYPES, ids=["int8", "uint8", "int16", "uint16", "int4", "uint4"])
def test_quantize_dequantize_numerics(qtype: int, np_type, opset: int, per_axis: bool) -> None:
    """Ties (half to even), saturation and zero points, per tensor and per axis, vs onnxruntime."""
    lo, hi = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT16: (-32768, 32767),
              TensorProto.UINT16: (0, 65535), TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}[qtype]
    channels = 3
    scale = np.array([0.02, 0.05, 0.1], np.float32) if per_axis else np.array(0.05, np.float32)
    zp_vals = [1, -2, 3] if lo < 0 else [3, 5, 7]
    zp_vals = zp_vals if per_axis else zp_vals[:1]
    zp = helper.make_tensor("zp", qtype, [channels] if per_axis else [], zp_vals)
    nodes = [N("QuantizeLinear", ["input", "s", "zp"], ["q"], axis=1),
             N("DequantizeLinear", ["q", "s", "zp"], ["logits"], axis=1)]
    model = _single(nodes, [("s", scale), zp], [channels, 7], opset=opset)
    rng = np.random.default_rng(7)
    s = scale.reshape(1, -1, 1) if per_axis else scale
    ties = (rng.integers(-6, 6, (4, channels, 7)) + 0.5).astype(np.float32) * s  # exact x/scale = k + 0.5
    wide = rng.uniform(-1, 1, (4, channels, 7)).astype(np.float32) * (hi - lo) * np.max(scale)  # saturates
    x = np.concatenate([ties.astype(np.float32), wide.astype(np.float32)])
    ref = _ort(model, x, optimized=False)
    np.testing.assert_array_equal(_mirror(model, x).reshape(len(x), -1), ref)


@pytest.mark.parametrize("qtype", [TensorProto.UINT8, TensorProto.INT8])
def test_com_microsoft_qdq_matches(qtype: int) -> None:
    zp = helper.make_tensor("zp", qtype, [], [3])
    nodes = [N("QuantizeLinear", ["input", "s", "zp"], ["q"], domain="com.microsoft"),
             N("DequantizeLinear", ["q", "s", "zp"], ["logits"], domain="com.microsoft")]
    model = _single(nodes, [("s", np.array(0.03, np.float32)), zp], [4], domains=("com.microsoft",))
    x = np.linspace(-5, 5, 40, dtype=np.float32).reshape(10, 4)
    np.testing.assert_array_equal(_mirror(model, x), _ort(model, x))


@pytest.mark.parametrize("ste", ["clipped", "identity"])
def test_straight_through_gradient(ste: str) -> None:
    """d fakequant / dx = 1/scale * scale = 1 inside the range; outside: 0 (clipped) or 1 (identity)."""
    x = torch.tensor([-7.0, -0.26, 0.0, 0.11, 2.0, 9.0], requires_grad=True)
    scale, zp = torch.tensor(0.05), torch.tensor(0.0)
    y = fake_quantize(x, scale, zp, -128, 127, ste) * scale
    y.sum().backward()
    inside = torch.tensor([False, True, True, True, True, False])
    expected = torch.where(inside, 1.0, 0.0 if ste == "clipped" else 1.0)
    torch.testing.assert_close(x.grad, expected)
    assert y.detach().tolist()[1] == pytest.approx(-0.25)  # -5.2 rounds to -5


@pytest.mark.parametrize("builder", [M.cnn, M.residual], ids=["cnn", "residual"])
def test_gradient_flows_through_qdq(builder) -> None:
    model = builder()
    qdq = quantize(model, M.random_input(model, n=16, seed=5), per_channel=True)
    mirror = build_mirror(qdq)
    x = torch.from_numpy(M.random_input(model, n=8, seed=8)).requires_grad_()
    logits = mirror(x)
    torch.nn.functional.cross_entropy(logits, logits.argmax(1)).backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) > x.numel() // 2
    # the STE gradient approximates the float model's gradient
    xf = x.detach().clone().requires_grad_()
    lf = build_mirror(model)(xf)
    torch.nn.functional.cross_entropy(lf, logits.argmax(1)).backward()
    cos = torch.nn.functional.cosine_similarity(x.grad.flatten(), xf.grad.flatten(), dim=0)
    assert cos > 0.5


def test_unsupported_op_is_named() -> None:
    # (was Erf, which the mirror now evaluates; STFT stands for any op it does not)
    model = _single([N("STFT", ["input", "step"], ["a"]), N("Relu", ["a"], ["logits"])], [("step", _i64(2))], [4])
    with pytest.raises(ModelError, match="STFT"):
        build_mirror(model)
    assert "STFT" not in supported_ops() and {"Conv", "QuantizeLinear", "com.microsoft:DequantizeLinear"} <= supported_ops()


def test_final_softmax_is_stripped_to_logits() -> None:
    base = M.cnn()
    model = onnx.ModelProto()
    model.CopyFrom(base)
    model.graph.node[-1].output[0] = "z"
    model.graph.node.append(N("Softmax", ["z"], ["logits"], axis=1))
    stripped, did = logits_model(model)
    assert did and len(model.graph.node) == len(stripped.graph.node) + 1
    x = M.random_input(base, n=4)
    ort = OrtModel(model)
    assert ort.softmax_stripped
    np.testing.assert_allclose(ort.predict(x), _ort(base, x), atol=1e-6)
    np.testing.assert_allclose(_mirror(stripped, x), _ort(base, x), atol=1e-5)


def test_art_wrappers_predict_logits() -> None:
    from laqonnx.robustness.ort_estimator import ort_classifier

    model = M.cnn()
    x = M.random_input(model, n=10)
    ref = _ort(model, x)
    art_mirror = mirror_classifier(build_mirror(model), (1, 8, 8), 10)
    art_ort = ort_classifier(OrtModel(model), (1, 8, 8), 10)
    np.testing.assert_allclose(art_mirror.predict(x), ref, atol=1e-5)
    np.testing.assert_allclose(art_ort.predict(x, batch_size=3), ref, atol=1e-6)
    grads = art_mirror.loss_gradient(x, np.eye(10)[ref.argmax(1)])
    assert grads.shape == x.shape and np.abs(grads).sum() > 0


def test_fixed_batch_axis_models_run_in_chunks() -> None:
    """A model exported with batch 1 (Reshape to [1, -1]): both onnxruntime and the mirror take N > 1."""
    rng = np.random.default_rng(9)
    nodes = [N("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]), N("Relu", ["c"], ["r"]),
             N("Reshape", ["r", "shape"], ["f"]), N("Gemm", ["f", "fc"], ["logits"], transB=1)]
    inits = [("w", rng.normal(0, 0.5, (2, 1, 3, 3)).astype(np.float32)), ("shape", _i64(1, -1)),
             ("fc", rng.normal(0, 0.3, (4, 2 * 5 * 5)).astype(np.float32))]
    graph = helper.make_graph(nodes, "b1", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 5, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
                              initializer=[numpy_helper.from_array(a, n) for n, a in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = M.random_input((1, 5, 5), n=5, seed=10)
    one_by_one = np.concatenate([_ort(model, x[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(OrtModel(model).predict(x, batch_size=3), one_by_one, atol=1e-6)
    xt = torch.from_numpy(x).requires_grad_()
    out = build_mirror(model)(xt)
    np.testing.assert_allclose(out.detach().numpy(), one_by_one, atol=1e-5)
    out.sum().backward()
    assert torch.count_nonzero(xt.grad.reshape(5, -1).abs().sum(1)) == 5


@pytest.mark.parametrize("arch", ["resnet", "mobilenet"])
def test_zoo_architectures_qdq_agree_within_an_output_quantum(arch: str) -> None:
    """Residual Adds, ReLU6 (Clip), depthwise convs. Float accumulation order (torch vs onnxruntime
    convolutions) can flip a value sitting on a rounding boundary: on these models that is a rare
    one-quantum change of a logit (measured: 2 of 500 examples for resnet on a VNNI Xeon, 5 of 200 on
    an AVX2 EPYC, whose kernels accumulate in another order), never of the argmax here."""
    from laqonnx.zoo.models import build_model

    torch.manual_seed(0)
    model = export(build_model(arch, in_channels=1, num_classes=10, image_size=16).eval(), torch.zeros(1, 1, 16, 16))
    x = M.random_input((1, 16, 16), n=200, seed=11)
    qdq = quantize(model, x[:16], per_channel=True)
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    last = next(n for n in qdq.graph.node if qdq.graph.output[0].name in n.output)
    assert last.op_type == "DequantizeLinear"
    quantum = float(inits[last.input[1]])
    got = _mirror(qdq, x)
    for optimized in (False, True):
        ref = _ort(qdq, x, optimized=optimized)
        diff = np.abs(got - ref).max(axis=1)
        assert diff.max() <= 2 * quantum * (1 + 1e-6)
        assert (diff > 0).mean() <= 0.05
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99


# --------------------------------------------------------------------------------------------
# ops of models exported by others (torch's two exporters, paddle, old opsets), each vs onnxruntime


def _ort_first(model: onnx.ModelProto, x: np.ndarray, optimized: bool, config: dict | None = None) -> np.ndarray:
    """onnxruntime's first output, whatever its type (no logits post-processing)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _check_against_ort(model: onnx.ModelProto, x: np.ndarray, rtol: float = 1e-5) -> np.ndarray:
    with torch.no_grad():
        got = build_mirror(model)(torch.from_numpy(x)).numpy()
    for optimized in (False, True):
        ref = _ort_first(model, x, optimized)
        assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, ref.shape, got.dtype, ref.dtype)
        np.testing.assert_allclose(got, ref, rtol=0, atol=rtol * max(1.0, float(np.abs(ref).max())))
    return got


def _floats(name: str, *values: float) -> tuple[str, np.ndarray]:
    return name, np.array(values, dtype=np.float32)


def _scalar(name: str, value, dtype=np.float32) -> tuple[str, np.ndarray]:
    return name, np.array(value, dtype=dtype)


F32 = TensorProto.FLOAT
FOREIGN_OP_MODELS = {  # name: (nodes, initializers, input shape without batch, opset)
    "hardsigmoid_hardswish_se_gate": (
        [N("HardSigmoid", ["input"], ["g"], alpha=0.3, beta=0.4), N("HardSwish", ["input"], ["h"]),
         N("HardSigmoid", ["h"], ["g2"]), N("Mul", ["h", "g"], ["m"]), N("Add", ["m", "g2"], ["logits"])],
        [], [3, 8], 17),
    "gelu_as_erf": (  # the legacy exporter's exact GELU: x * 0.5 * (1 + erf(x / sqrt 2))
        [N("Div", ["input", "sqrt2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["a"]),
         N("Mul", ["input", "a"], ["m"]), N("Mul", ["m", "half"], ["logits"])],
        [_scalar("sqrt2", np.sqrt(2.0)), _scalar("one", 1.0), _scalar("half", 0.5)], [3, 8], 17),
    "gelu_opset20_exact_and_tanh": (
        [N("Gelu", ["input"], ["a"]), N("Gelu", ["input"], ["b"], approximate="tanh"),
         N("Concat", ["a", "b"], ["logits"], axis=1)], [], [3, 8], 20),
    "layernorm_last_axis_with_bias": (
        [N("LayerNormalization", ["input", "g", "b"], ["logits"], axis=-1, epsilon=1e-3)],
        [("g", _f(8, seed=4)), ("b", _f(8, seed=5))], [3, 8], 17),
    "layernorm_axis1_no_bias": (
        [N("LayerNormalization", ["input", "g"], ["logits"], axis=1)], [("g", _f(3, 8, seed=6))], [3, 8], 17),
    "layernorm_decomposed_opset11": (  # the opset-11 export of nn.LayerNorm
        [N("ReduceMean", ["input"], ["mu"], axes=[-1]), N("Sub", ["input", "mu"], ["c"]),
         N("Pow", ["c", "two"], ["p"]), N("ReduceMean", ["p"], ["var"], axes=[-1]), N("Add", ["var", "eps"], ["ve"]),
         N("Sqrt", ["ve"], ["sd"]), N("Div", ["c", "sd"], ["logits"])],
        [_scalar("two", 2.0), _scalar("eps", 1e-5)], [3, 8], 11),
    "exp_log_pow_sqrt_reciprocal_neg_abs_sign": (
        [N("Abs", ["input"], ["ab"]), N("Add", ["ab", "small"], ["pos"]), N("Log", ["pos"], ["lg"]),
         N("Sqrt", ["pos"], ["sq"]), N("Reciprocal", ["pos"], ["rc"]), N("Exp", ["input"], ["ex"]),
         N("Neg", ["ex"], ["ng"]), N("Pow", ["input", "three"], ["p3"]), N("Pow", ["pos", "frac"], ["pf"]),
         N("Sign", ["input"], ["sg"]),
         N("Sum", ["lg", "sq", "rc", "ng", "p3", "pf", "sg"], ["logits"])],
        [_scalar("small", 0.1), _scalar("three", 3, np.int64), _scalar("frac", 0.7)], [3, 8], 17),
    "softplus_elu_selu_celu_prelu_mish": (
        [N("Softplus", ["input"], ["a"]), N("Elu", ["input"], ["b"], alpha=0.7), N("Selu", ["input"], ["c"]),
         N("Celu", ["input"], ["d"], alpha=1.3), N("PRelu", ["input", "slope"], ["e"]),
         N("ThresholdedRelu", ["input"], ["f"], alpha=0.2), N("Mish", ["input"], ["g"]), N("Softsign", ["input"], ["h"]),
         N("Concat", ["a", "b", "c", "d", "e", "f", "g", "h"], ["logits"], axis=2)],
        [("slope", _f(3, 1, seed=7))], [3, 8], 18),
    "compare_logic_where": (
        [N("Round", ["input"], ["r"]), N("Equal", ["r", "zero"], ["eq"]), N("Less", ["input", "lo"], ["lt"]),
         N("Greater", ["input", "hi"], ["gt"]), N("LessOrEqual", ["input", "zero"], ["le"]),
         N("GreaterOrEqual", ["input", "zero"], ["ge"]), N("Not", ["eq"], ["ne"]), N("And", ["ne", "le"], ["an"]),
         N("Or", ["lt", "gt"], ["o"]), N("Xor", ["an", "ge"], ["xo"]),
         N("Where", ["o", "input", "zero"], ["w1"]), N("Where", ["xo", "w1", "input"], ["w2"]),
         N("Cast", ["an"], ["cf"], to=F32), N("Add", ["w2", "cf"], ["logits"])],
        [_scalar("zero", 0.0), _scalar("lo", -0.4), _scalar("hi", 0.3)], [3, 8], 17),
    "max_min_mean_mod": (
        [N("Max", ["input", "c"], ["a"]), N("Min", ["input", "c", "a"], ["b"]), N("Mean", ["a", "b", "input"], ["m"]),
         N("Mod", ["input", "c"], ["f"], fmod=1), N("Add", ["m", "f"], ["logits"])],
        [("c", _f(8, seed=8))], [3, 8], 17),
    "expand_tile_einsum": (
        [N("Unsqueeze", ["input", "ax1"], ["u"]), N("Expand", ["u", "shape"], ["e"]),
         N("Tile", ["input", "reps"], ["t"]), N("Einsum", ["t", "w"], ["es"], equation="bij,jk->bik"),
         N("Einsum", ["input", "input"], ["gram"], equation="bij, bkj -> bik"),
         N("ReduceSum", ["e", "ax1"], ["rs"], keepdims=0), N("MatMul", ["rs", "w"], ["mw"]),
         N("Concat", ["es", "mw"], ["ecat"], axis=1), N("Flatten", ["ecat"], ["fl"]),
         N("Flatten", ["gram"], ["fg"]), N("Concat", ["fl", "fg"], ["logits"], axis=1)],
        [("ax1", _i64(1)), ("shape", _i64(1, 2, 1, 1)), ("reps", _i64(1, 2, 1)), ("w", _f(8, 5, seed=9))], [3, 8], 17),
    "split_attribute_opset11": (
        [N("Split", ["input"], ["a", "b", "c"], axis=2, split=[2, 5, 1]), N("Split", ["input"], ["d", "e"], axis=1),
         N("Concat", ["c", "a", "b"], ["abc"], axis=2), N("Concat", ["e", "d"], ["de"], axis=1),
         N("Sub", ["abc", "de"], ["logits"])], [], [4, 8], 11),
    "split_input_opset13": (
        [N("Split", ["input", "sizes"], ["a", "b"], axis=-1), N("Split", ["input"], ["c", "d"], axis=1),
         N("ReduceSum", ["a", "axes"], ["ra"]), N("Mul", ["b", "ra"], ["m"]), N("Concat", ["m", "a"], ["ma"], axis=2),
         N("Concat", ["d", "c"], ["dc"], axis=1), N("Add", ["ma", "dc"], ["logits"])],
        [("sizes", _i64(3, 5)), ("axes", _i64(-1))], [4, 8], 13),
    "split_num_outputs_opset18": (  # 8 into 3: chunks 3, 3, 2
        [N("Split", ["input"], ["a", "b", "c"], axis=2, num_outputs=3), N("ReduceMax", ["a", "ax"], ["ma"]),
         N("ReduceMin", ["b", "ax"], ["mb"], keepdims=0), N("Unsqueeze", ["mb", "ax"], ["ub"]),
         N("Add", ["ma", "ub"], ["s"]), N("Mul", ["c", "s"], ["logits"])], [("ax", _i64(2))], [4, 8], 18),
    "reductions_attribute_axes_opset11": (
        [N("ReduceSum", ["input"], ["s"], axes=[1, 2], keepdims=0), N("ReduceMax", ["input"], ["mx"], axes=[-1]),
         N("ReduceMin", ["input"], ["mn"], axes=[1], keepdims=0), N("ReduceMean", ["input"], ["me"], axes=[1, 2]),
         N("ReduceProd", ["input"], ["pr"], axes=[1]), N("ReduceL1", ["input"], ["l1"], axes=[2]),
         N("ReduceL2", ["input"], ["l2"], axes=[2]), N("ReduceSumSquare", ["input"], ["ss"], axes=[1]),
         N("ReduceLogSumExp", ["input"], ["lse"], axes=[2], keepdims=0),
         N("Flatten", ["mx"], ["f1"]), N("Flatten", ["pr"], ["f2"]), N("Flatten", ["l1"], ["f3"]),
         N("Flatten", ["l2"], ["f4"]), N("Flatten", ["ss"], ["f5"]), N("Flatten", ["me"], ["f6"]),
         N("Unsqueeze", ["s"], ["f7"], axes=[1]),
         N("Concat", ["f1", "f2", "f3", "f4", "f5", "f6", "f7", "mn", "lse"], ["logits"], axis=1)], [], [3, 5], 11),
    "reductions_input_axes_opset18": (
        [N("ReduceSum", ["input", "a12"], ["s"], keepdims=0), N("ReduceMax", ["input", "am1"], ["mx"]),
         N("ReduceMin", ["input", "a1"], ["mn"], keepdims=0), N("ReduceMean", ["input", "am1"], ["me"]),
         N("ReduceSum", ["input", "none"], ["noop"], noop_with_empty_axes=1), N("ReduceMax", ["input"], ["all"]),
         N("ReduceL2", ["input", "a1"], ["l2"]), N("Add", ["noop", "mx"], ["n1"]), N("Add", ["n1", "me"], ["n2"]),
         N("Add", ["n2", "all"], ["n3"]), N("Add", ["n3", "l2"], ["n4"]), N("Flatten", ["n4"], ["fl"]),
         N("Unsqueeze", ["s", "a1"], ["us"]), N("Concat", ["fl", "us", "mn"], ["logits"], axis=1)],
        [("a12", _i64(1, 2)), ("am1", _i64(-1)), ("a1", _i64(1)), ("none", np.zeros(0, np.int64))], [3, 5], 18),
    "range_constant_of_shape": (  # a position index built from the input's shape, as exports do
        [N("Shape", ["input"], ["sh"]), N("Gather", ["sh", "i2"], ["n"], axis=0), N("Range", ["z", "n", "one"], ["r"]),
         N("Cast", ["r"], ["rf"], to=F32), N("Mul", ["input", "rf"], ["m"]),
         N("ConstantOfShape", ["sh"], ["c"], value=helper.make_tensor("v", F32, [1], [0.25])),
         N("ConstantOfShape", ["sh"], ["zeros"]), N("Add", ["m", "c"], ["a"]), N("Add", ["a", "zeros"], ["b"]),
         N("Range", ["fs", "fl", "fd"], ["fr"]), N("Add", ["b", "fr"], ["logits"])],
        [("i2", np.array(2, np.int64)), ("z", np.array(0, np.int64)), ("one", np.array(1, np.int64)),
         _scalar("fs", 0.5), _scalar("fl", 4.4), _scalar("fd", 0.5)], [3, 8], 17),
}


@pytest.mark.parametrize("name", sorted(FOREIGN_OP_MODELS))
def test_foreign_op_graphs_match_onnxruntime(name: str) -> None:
    nodes, inits, shape, opset = FOREIGN_OP_MODELS[name]
    model = _single(nodes, inits, shape, opset=opset)
    x = _f(4, *shape, seed=12, scale=1.0)
    x[0, 0, :3] = [0.0, -0.5, 0.5]  # exact zeros and halves: Sign, Round/Equal, ties of the comparisons
    _check_against_ort(model, x)
    # and the gradient flows back to the input, finite
    xt = torch.from_numpy(x).requires_grad_()
    out = build_mirror(model)(xt).float()
    (out * torch.from_numpy(_f(*out.shape, seed=13))).sum().backward()
    assert xt.grad is not None and torch.isfinite(xt.grad).all() and torch.count_nonzero(xt.grad) > 0


def _resize_model(opset: int, op: str = "Resize", scales=None, sizes=None, **attrs) -> onnx.ModelProto:
    """One Resize / Upsample on a (N, 2, 4, 5) input, its scales / sizes given in the opset's input form."""
    inits: list = []
    if op == "Upsample" or opset < 11:
        inputs = ["input", "scales"]
        inits.append(("scales", np.array(scales, np.float32)))
    else:
        roi = "roi" if opset < 13 else ""
        if roi:
            inits.append(("roi", np.zeros(0, np.float32)))
        inputs = ["input", roi]
        if scales is not None:
            inputs.append("scales")
            inits.append(("scales", np.array(scales, np.float32)))
        else:
            inputs.append("scales" if opset < 13 else "")
            if opset < 13:
                inits.append(("scales", np.zeros(0, np.float32)))
            inputs.append("sizes")
            inits.append(("sizes", np.array(sizes, np.int64)))
    return _single([N(op, inputs, ["logits"], **attrs)], inits, [2, 4, 5], opset=opset)


RESIZE_CASES = {  # name: (opset, op, scales, sizes, attributes)
    "upsample9_nearest": (9, "Upsample", [1, 1, 2, 3], None, {"mode": "nearest"}),
    "upsample9_linear": (9, "Upsample", [1, 1, 2, 1.5], None, {"mode": "linear"}),
    "resize10_nearest_up": (10, "Resize", [1, 1, 2, 2], None, {"mode": "nearest"}),
    "resize10_nearest_down": (10, "Resize", [1, 1, 0.5, 0.6], None, {"mode": "nearest"}),
    "resize10_linear": (10, "Resize", [1, 1, 2, 0.6], None, {"mode": "linear"}),
    "torch11_nearest_asymmetric_floor": (11, "Resize", [1, 1, 2, 2], None, dict(
        mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")),
    "torch11_bilinear_half_pixel": (11, "Resize", [1, 1, 2, 2], None, dict(
        mode="linear", coordinate_transformation_mode="half_pixel")),
    "torch11_bilinear_align_corners_sizes": (11, "Resize", None, [3, 2, 7, 3], dict(
        mode="linear", coordinate_transformation_mode="align_corners")),
    "tf_half_pixel_for_nn_11": (11, "Resize", [1, 1, 1.5, 0.8], None, dict(
        mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn")),
    "torch13_nearest_sizes": (13, "Resize", None, [3, 2, 5, 7], dict(
        mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")),
    "torch17_bilinear_down_half_pixel": (17, "Resize", [1, 1, 0.5, 0.5], None, dict(
        mode="linear", coordinate_transformation_mode="half_pixel")),
    "pytorch_half_pixel_to_one_row": (17, "Resize", None, [3, 2, 1, 8], dict(
        mode="linear", coordinate_transformation_mode="pytorch_half_pixel")),
    "default_round_prefer_floor": (13, "Resize", [1, 1, 1.5, 2.5], None, {"mode": "nearest"}),
    "round_prefer_ceil_and_ceil": (13, "Resize", [1, 1, 1.5, 0.7], None, dict(mode="nearest",
                                                                            nearest_mode="round_prefer_ceil")),
    "nearest_ceil": (13, "Resize", [1, 1, 1.7, 1.3], None, dict(mode="nearest", nearest_mode="ceil")),
    "cubic_half_pixel": (13, "Resize", [1, 1, 2, 1.6], None, {"mode": "cubic"}),
    "cubic_exclude_outside_a05": (13, "Resize", [1, 1, 1.5, 0.8], None, dict(
        mode="cubic", cubic_coeff_a=-0.5, exclude_outside=1, coordinate_transformation_mode="asymmetric")),
    "dynamo20_bilinear": (20, "Resize", [1, 1, 2, 2], None, dict(
        mode="linear", coordinate_transformation_mode="half_pixel", nearest_mode="floor", antialias=0,
        keep_aspect_ratio_policy="stretch", cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0)),
    "opset18_axes_not_larger": (18, "Resize", None, [9, 7], dict(
        mode="linear", axes=[2, 3], keep_aspect_ratio_policy="not_larger")),
    "opset18_axes_not_smaller_nearest": (18, "Resize", None, [9, 7], dict(
        mode="nearest", axes=[2, 3], keep_aspect_ratio_policy="not_smaller")),
    # (onnxruntime 1.32 ignores keep_aspect_ratio_policy's negative axes: those are checked with "stretch")
    "opset18_negative_axes_stretch": (18, "Resize", None, [9, 7], dict(mode="linear", axes=[-2, -1])),
    "opset19_half_pixel_symmetric": (19, "Resize", [1, 1, 1.7, 0.7], None, dict(
        mode="linear", coordinate_transformation_mode="half_pixel_symmetric")),
    "antialias_upsampling_is_plain": (18, "Resize", [1, 1, 2, 1.5], None, dict(mode="linear", antialias=1)),
}


@pytest.mark.parametrize("name", sorted(RESIZE_CASES))
def test_resize_forms_match_onnxruntime(name: str) -> None:
    opset, op, scales, sizes, attrs = RESIZE_CASES[name]
    model = _resize_model(opset, op, scales, sizes, **attrs)
    x = _f(3, 2, 4, 5, seed=14, scale=1.0)
    got = _check_against_ort(model, x)
    assert got.shape[2:] != x.shape[2:]  # it really resized
    xt = torch.from_numpy(x).requires_grad_()
    build_mirror(model)(xt).sum().backward()
    assert torch.isfinite(xt.grad).all() and torch.count_nonzero(xt.grad) > 0


@pytest.mark.parametrize("attrs", [dict(coordinate_transformation_mode="tf_crop_and_resize", mode="linear"),
                                   dict(mode="linear", antialias=1)], ids=["tf_crop_and_resize", "antialias_down"])
def test_resize_forms_refused_by_name(attrs) -> None:
    model = _resize_model(18, "Resize", [1, 1, 0.5, 0.5], None, **attrs)
    with pytest.raises(ModelError, match="tf_crop_and_resize|antialias"):
        build_mirror(model)(torch.zeros(1, 2, 4, 5))


# --------------------------------------------------------------------------------------------
# blocked quantization (opset 21 block_size), as ModelOpt / Quark write int4 weights

BLOCK_QTYPES = {"int4": (TensorProto.INT4, -8, 7), "uint4": (TensorProto.UINT4, 0, 15),
                "int8": (TensorProto.INT8, -128, 127), "uint8": (TensorProto.UINT8, 0, 255)}
BLOCKINGS = {"axis0_b2": (0, 2), "axis1_b3_ragged": (1, 3), "axis1_b16_one_block": (1, 16), "axis-1_b4_ragged": (-1, 4)}


def _blocked_params(shape, axis: int, block: int, qtype: int, lo: int, hi: int, seed: int):
    rng = np.random.default_rng(seed)
    pshape = list(shape)
    pshape[axis] = -(-shape[axis] // block)
    scale = rng.uniform(0.05, 0.4, pshape).astype(np.float32)
    zp = helper.make_tensor("zp", qtype, pshape, rng.integers(lo, hi + 1, pshape).reshape(-1).tolist())
    return scale, zp


def _expand_block(p: np.ndarray, axis: int, block: int, length: int) -> np.ndarray:
    return np.repeat(p, block, axis=axis).take(np.arange(length), axis=axis)


@pytest.mark.parametrize("blocking", sorted(BLOCKINGS))
@pytest.mark.parametrize("qname", sorted(BLOCK_QTYPES))
def test_blocked_quantize_dequantize_bit_exact(qname: str, blocking: str) -> None:
    """QuantizeLinear -> DequantizeLinear blocked along an axis: ties, saturation, zero points, ragged blocks."""
    qtype, lo, hi = BLOCK_QTYPES[qname]
    axis, block = BLOCKINGS[blocking]
    shape = (6, 7)  # the model input is (N=shape[0], shape[1]); blocks run along the batch axis too (axis 0)
    scale, zp = _blocked_params(shape, axis, block, qtype, lo, hi, seed=15)
    nodes = [N("QuantizeLinear", ["input", "s", "zp"], ["q"], axis=axis, block_size=block),
             N("DequantizeLinear", ["q", "s", "zp"], ["logits"], axis=axis, block_size=block)]
    graph = helper.make_graph(nodes, "b", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(scale, "s"), zp])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    rng = np.random.default_rng(16)
    s_full = _expand_block(scale, axis % 2, block, shape[axis % 2])
    ties = (rng.integers(-5, 5, shape) + 0.5).astype(np.float32) * s_full  # x / scale exactly k + 0.5
    wide = rng.uniform(-1, 1, shape).astype(np.float32) * (hi - lo) * s_full  # saturates both ends
    for x in (ties.astype(np.float32), wide.astype(np.float32)):
        got = _check_against_ort(model, x, rtol=0)
        assert len(np.unique(got)) > 4
    # an independent answer: the blocked formula written out with numpy
    z_full = _expand_block(numpy_helper.to_array(zp).astype(np.float32), axis % 2, block, shape[axis % 2])
    q = np.clip(np.round(wide / s_full) + z_full, lo, hi)
    np.testing.assert_array_equal(got, ((q - z_full) * s_full).astype(np.float32))


@pytest.mark.parametrize("qname", ["int4", "uint4", "int8"])
def test_blocked_dequantize_of_weights_bit_exact(qname: str) -> None:
    qtype, lo, hi = BLOCK_QTYPES[qname]
    shape, axis, block = (5, 11), 1, 4  # 11 = 4 + 4 + 3: a ragged last block
    rng = np.random.default_rng(17)
    wq = rng.integers(lo, hi + 1, shape)
    w = helper.make_tensor("w", qtype, list(shape), wq.reshape(-1).tolist())
    scale, zp = _blocked_params(shape, axis, block, qtype, lo, hi, seed=18)
    nodes = [N("DequantizeLinear", ["w", "s", "zp"], ["d"], axis=axis, block_size=block),
             N("Add", ["input", "d"], ["logits"])]
    model = _single(nodes, [w, ("s", scale), zp], [5, 11], opset=21)
    got = _check_against_ort(model, np.zeros((2, 5, 11), np.float32), rtol=0)
    z_full = _expand_block(numpy_helper.to_array(zp).astype(np.float32), axis, block, 11)
    expected = ((wq.astype(np.float32) - z_full) * _expand_block(scale, axis, block, 11)).astype(np.float32)
    np.testing.assert_array_equal(got[1], expected)


@pytest.mark.parametrize("qname", ["int4", "uint4", "int8"])
@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_blocked_weight_matmul_gemm(op: str, qname: str) -> None:
    """A MatMul / Gemm whose weight is dequantized block-wise along the reduction axis (K = 40, blocks of 16:
    16 + 16 + 8), as int4 weight-only quantizers write.

    onnxruntime's optimizer fuses DQ + MatMul into com.microsoft MatMulNBits, by default at accuracy level 4:
    it then quantizes the *activations* to int8 per block, which is not the graph's arithmetic (measured here:
    0.3 % of the largest logit). The mirror computes the graph: it matches onnxruntime unoptimized and fused
    at accuracy level 0 (float activations) to 1e-5, and the default fused kernel to that int8 error."""
    qtype, lo, hi = BLOCK_QTYPES[qname]
    k, n, block = 40, 6, 16
    rng = np.random.default_rng(19)
    shape = (k, n) if op == "MatMul" else (n, k)  # Gemm with transB=1 holds the weight as (N, K)
    axis = 0 if op == "MatMul" else 1
    wq = rng.integers(lo, hi + 1, shape)
    w = helper.make_tensor("w", qtype, list(shape), wq.reshape(-1).tolist())
    scale, zp = _blocked_params(shape, axis, block, qtype, lo, hi, seed=20)
    dq = N("DequantizeLinear", ["w", "s", "zp"], ["wd"], axis=axis, block_size=block)
    bias = _f(n, seed=21)
    main = (N("MatMul", ["input", "wd"], ["logits"]) if op == "MatMul"
            else N("Gemm", ["input", "wd", "bias"], ["logits"], transB=1))
    model = _single([dq, main], [w, ("s", scale), zp, ("bias", bias)], [k], opset=21)
    x = _f(8, k, seed=22, scale=1.0)
    with torch.no_grad():
        got = build_mirror(model)(torch.from_numpy(x)).numpy()
    tol = 1e-5 * np.abs(got).max()
    z_full = _expand_block(numpy_helper.to_array(zp).astype(np.float32), axis, block, k)
    w_float = (wq - z_full) * _expand_block(scale, axis, block, k)  # float64: an independent answer
    expected = x @ w_float if op == "MatMul" else x @ w_float.T + bias
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol)
    np.testing.assert_allclose(got, _ort_first(model, x, optimized=False), rtol=0, atol=tol)
    fp32_fused = _ort_first(model, x, optimized=True, config={"session.qdq_matmulnbits_accuracy_level": "0"})
    np.testing.assert_allclose(got, fp32_fused, rtol=0, atol=tol)
    default = _ort_first(model, x, optimized=True)
    assert np.abs(got - default).max() <= (1e-2 if op == "MatMul" else 1e-5) * np.abs(got).max()
    xt = torch.from_numpy(x).requires_grad_()
    build_mirror(model)(xt).sum().backward()
    assert torch.isfinite(xt.grad).all() and torch.count_nonzero(xt.grad) == xt.numel()


def test_malformed_blocked_quantization_rejected() -> None:
    """A blocked scale whose shape does not tile the input (4 columns in blocks of 2 need 2 scales, not 3)."""
    zp = helper.make_tensor("zp", TensorProto.INT8, [1, 3], [0, 0, 0])
    nodes = [N("DequantizeLinear", ["w", "s", "zp"], ["d"], axis=1, block_size=2), N("Add", ["input", "d"], ["logits"])]
    w = helper.make_tensor("w", TensorProto.INT8, [1, 4], [1, 2, 3, 4])
    model = _single(nodes, [w, ("s", np.ones((1, 3), np.float32)), zp], [4], opset=21)
    with pytest.raises(ModelError, match="block"):
        build_mirror(model)(torch.zeros(1, 4))
