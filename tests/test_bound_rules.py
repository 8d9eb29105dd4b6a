"""Bound rules against independent answers: exact values where the operator's norm is known, else
the empirical gain of the ONNX op itself in onnxruntime (central differences: the largest slope of
an elementwise op over a fine grid, the spectral norm of the finite-difference Jacobian at many
points), which a sound bound must not undercut and a tight one must not exceed by much.
Data-dependent rules: unknown without calibration ranges, with them above the gain on the
calibration points. An unknown bound is None (JSON null, "unknown"), never 0."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from laqonnx.cli import main
from laqonnx.graph import load_model
from laqonnx.lipschitz import RULES, NoRule, network_bounds, operator_norm, register_rule
from laqonnx.lipschitz.analyze import analyze
from laqonnx.lipschitz.calib import calibrated_ranges
from laqonnx.lipschitz.rules_nonlinear import ERF_MAX, GELU_MAX, SILU_MAX
from laqonnx.vocab import BoundKind

MS = helper.make_opsetid("com.microsoft", 1)


def _init(name, array, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)


def _model(nodes, shape, inits=(), opset=17, domains=(), out="o"):
    """x0 (N, *shape) -> MatMul(identity) "id" -> input -> nodes -> ``out``: the network bound is the
    bound of ``nodes`` alone (the identity layer has norm 1)."""
    nodes = [helper.make_node("MatMul", ["x0", "eye"], ["input"], name="id"), *nodes]
    inits = [*inits, _init("eye", np.eye(shape[-1]))]
    graph = helper.make_graph(nodes, "rule", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", *shape])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *domains])
    model.ir_version = 8 if opset < 21 else 10
    for o in model.graph.output:  # the checker wants a shape: give the rank ONNX infers
        inferred = onnx.shape_inference.infer_shapes(model).graph
        rank = next((len(v.type.tensor_type.shape.dim) for v in [*inferred.value_info, *inferred.output]
                     if v.name == o.name and v.type.tensor_type.HasField("shape")), None)
        o.type.tensor_type.shape.dim.extend([helper.make_tensor_value_info("_", TensorProto.FLOAT, [f"d{i}"])
                                             .type.tensor_type.shape.dim[0] for i in range(rank or 0)])
    return model


def _bounds(model, ranges=None):
    pm = load_model(model)
    norms = {layer.name: operator_norm(layer, pm.weight(layer)).value for layer in pm.layers}
    return pm, norms, network_bounds(pm, norms, ranges)


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x0": np.ascontiguousarray(x, np.float32)})[0].astype(np.float64)


def _max_slope(model, x, h=1e-3):
    """max_i |f(x + h)_i - f(x - h)_i| / 2h of an elementwise model: a lower bound on its Lipschitz constant."""
    return float(np.max(np.abs(_run(model, x + h) - _run(model, x - h))) / (2 * h))


def _jacobian_norm(model, x, h=1e-3):
    """Spectral norm of the central-difference Jacobian of ``model`` at the point ``x`` (shape (1, ...))."""
    n = x[0].size
    eye = np.eye(n).reshape((n, *x.shape[1:]))
    diff = _run(model, x + h * eye) - _run(model, x - h * eye)  # (n, *out)
    return float(np.linalg.norm(diff.reshape(n, -1).T / (2 * h), 2))


GRID = np.linspace(-8, 8, 64 * 100).reshape(1, 100, 64)  # 6400 points, step 0.0025


# --- registry ---------------------------------------------------------------------------------------

def test_registry_is_keyed_by_domain_and_op():
    assert ("", "Relu") in RULES and ("com.microsoft", "FastGelu") in RULES and "Relu" not in RULES
    model = _model([helper.make_node("Swish", ["input"], ["o"], name="sw", domain="com.example")], (4,),
                   domains=[helper.make_opsetid("com.example", 1)])
    assert _bounds(model)[2].unknown_ops == ("sw (com.example.Swish)",)
    register_rule("Swish", domain="com.example")(lambda node, L, ctx: 3.0 * L[0])
    register_rule("Relu", domain="ai.onnx")(RULES[("", "Relu")])  # "ai.onnx" is the default domain
    try:
        assert _bounds(model)[2].network_bound == pytest.approx(3.0)
        assert ("ai.onnx", "Relu") not in RULES
    finally:
        del RULES[("com.example", "Swish")]


# --- activations: exact constants and empirical slopes ----------------------------------------------

ACTIVATIONS = {
    # name: (node, opset, domains, exact bound or None, tight: bound within 0.5% of the measured slope)
    "hardsigmoid": (helper.make_node("HardSigmoid", ["input"], ["o"], name="op", alpha=0.3, beta=0.4), 17, (), 0.3, True),
    "hardswish": (helper.make_node("HardSwish", ["input"], ["o"], name="op"), 14, (), 1.5, True),
    "erf": (helper.make_node("Erf", ["input"], ["o"], name="op"), 17, (), 2 / math.sqrt(math.pi), True),
    "gelu-20": (helper.make_node("Gelu", ["input"], ["o"], name="op"), 20, (), None, True),
    "gelu-20-tanh": (helper.make_node("Gelu", ["input"], ["o"], name="op", approximate="tanh"), 20, (), None, True),
    "ms-gelu": (helper.make_node("Gelu", ["input"], ["o"], name="op", domain="com.microsoft"), 17, (MS,), None, True),
    "ms-fastgelu": (helper.make_node("FastGelu", ["input"], ["o"], name="op", domain="com.microsoft"), 17, (MS,), None, True),
    "ms-quickgelu": (helper.make_node("QuickGelu", ["input"], ["o"], name="op", domain="com.microsoft", alpha=1.702), 17,
                     (MS,), None, True),
    "mish": (helper.make_node("Mish", ["input"], ["o"], name="op"), 18, (), None, True),
    "softmax": (helper.make_node("Softmax", ["input"], ["o"], name="op"), 17, (), 1.0, False),
    "elu": (helper.make_node("Elu", ["input"], ["o"], name="op", alpha=2.0), 17, (), 2.0, True),
}


@pytest.mark.parametrize("case", list(ACTIVATIONS))
def test_activation_bound(case):
    node, opset, domains, exact, tight = ACTIVATIONS[case]
    model = _model([node], (100, 64), opset=opset, domains=domains)
    bounds = _bounds(model)[2]
    assert bounds.unknown_ops == () and bounds.bound_kind == BoundKind.GLOBAL
    bound = bounds.network_bound
    if exact is not None:
        assert bound == pytest.approx(exact, rel=1e-6)
    slope = _max_slope(model, GRID) if case != "softmax" else max(_jacobian_norm(_model([node], (64,)), GRID[:, i]) for i in range(0, 100, 7))
    assert slope <= bound * (1 + 1e-3)  # central differences in float32: ~1e-4 noise
    if tight:
        assert bound <= slope * 1.005


def test_the_constants_are_the_maxima():
    x = np.linspace(-10, 10, 2_000_001)
    s = 1 / (1 + np.exp(-x))
    assert 0 <= SILU_MAX - np.max(s * (1 + x * (1 - s))) < 1e-4
    phi = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    from scipy.special import erf

    assert 0 <= GELU_MAX - np.max(0.5 * (1 + erf(x / math.sqrt(2))) + x * phi) < 1e-4
    assert ERF_MAX == pytest.approx(np.max(np.gradient(erf(x), x)), rel=1e-6)


# --- self-gated products (torch exports): global bounds through the producer graph ------------------

def _gated(kind):
    def c(name, v):
        return _init(name, np.array(v))

    if kind == "silu":
        return [helper.make_node("Sigmoid", ["input"], ["s"]), helper.make_node("Mul", ["input", "s"], ["o"], name="op")], (), SILU_MAX
    if kind == "quickgelu":
        return [helper.make_node("Mul", ["input", "a"], ["ax"]), helper.make_node("Sigmoid", ["ax"], ["s"]),
                helper.make_node("Mul", ["s", "input"], ["o"], name="op")], (c("a", 1.702),), SILU_MAX
    if kind == "hardswish-opset11":  # torch < opset 14: x * HardSigmoid(x, alpha=1/6)
        return [helper.make_node("HardSigmoid", ["input"], ["s"], alpha=1 / 6, beta=0.5),
                helper.make_node("Mul", ["input", "s"], ["o"], name="op")], (), 1.5
    if kind == "gelu-erf":  # torchscript: x * 0.5 * (1 + erf(x / sqrt 2)), as Mul(x, 1 + erf) then * 0.5
        return [helper.make_node("Div", ["input", "r2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                helper.make_node("Add", ["e", "one"], ["g"]), helper.make_node("Mul", ["input", "g"], ["m"], name="op"),
                helper.make_node("Mul", ["m", "half"], ["o"])], (c("r2", 2 ** 0.5), c("one", 1.0), c("half", 0.5)), GELU_MAX
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["silu", "quickgelu", "hardswish-opset11", "gelu-erf"])
def test_self_gated_product_is_a_global_bound(kind):
    nodes, inits, expected = _gated(kind)
    model = _model(nodes, (100, 64), inits)
    bounds = _bounds(model)[2]
    assert bounds.bound_kind == BoundKind.GLOBAL and bounds.data_dependent == ()
    assert bounds.network_bound == pytest.approx(expected, rel=2e-4)
    slope = _max_slope(model, GRID)
    assert slope <= bounds.network_bound * (1 + 1e-4) and bounds.network_bound <= slope * 1.005


def test_a_gate_of_another_tensor_is_no_pattern():
    nodes = [helper.make_node("Neg", ["input"], ["n"]), helper.make_node("Sigmoid", ["n"], ["s"]),
             helper.make_node("Mul", ["input", "s"], ["o"], name="op")]
    bounds = _bounds(_model(nodes, (8,)))[2]
    assert bounds.network_bound is None and bounds.unknown_ops == ("op (Mul)",)
    assert "data-dependent" in bounds.unknown_reasons["op (Mul)"]  # the rule's reason is kept, not dropped


# --- LogSoftmax, broadcasting, reductions, Pad --------------------------------------------------------

def test_log_softmax_is_sqrt_n_and_approached_near_one_hot():
    model = _model([helper.make_node("LogSoftmax", ["input"], ["o"], name="op", axis=-1)], (5,))
    bound = _bounds(model)[2].network_bound
    assert bound == pytest.approx(math.sqrt(5))
    rng = np.random.default_rng(0)
    gains = [_jacobian_norm(model, rng.normal(0, 3, (1, 5))) for _ in range(50)]
    assert max(gains) <= bound * (1 + 1e-4)
    assert _jacobian_norm(model, np.array([[12.0, 0, 0, 0, 0]])) >= 0.999 * bound  # sqrt(n) ||p|| -> sqrt(n)


def test_broadcast_input_grows_its_perturbation():
    """Add(x (N,2,1,1), zeros (1,2,4,4)): each element is copied 16 times, so the map's norm is 4."""
    nodes = [helper.make_node("Unsqueeze", ["input", "ax"], ["u"]), helper.make_node("Add", ["u", "z"], ["o"], name="op")]
    model = _model(nodes, (2,), [_init("ax", [2, 3], np.int64), _init("z", np.zeros((1, 2, 4, 4)))])
    bound = _bounds(model)[2].network_bound
    assert bound == pytest.approx(4.0)
    assert _jacobian_norm(model, np.ones((1, 2))) == pytest.approx(4.0, rel=1e-3)


@pytest.mark.parametrize("op,opset,exact", [("ReduceSum", 13, 3.0), ("ReduceMean", 13, 1 / 3.0), ("ReduceMean", 18, 1 / 3.0),
                                           ("ReduceSum", 11, 3.0)])
def test_reduce_with_axes_attribute_or_input(op, opset, exact):
    """Summing k = 9 values: operator norm sqrt(9) = 3; their mean: 1/3 (axes an attribute before
    opset 18, 13 for ReduceSum; opset 11 is upgraded on intake)."""
    if opset < (13 if op == "ReduceSum" else 18):
        node = helper.make_node(op, ["input"], ["o"], name="op", axes=[2], keepdims=0)
        inits = ()
    else:
        node = helper.make_node(op, ["input", "axes"], ["o"], name="op", keepdims=1)
        inits = (_init("axes", [2], np.int64),)
    model = _model([node], (2, 9), inits, opset=opset)
    assert _bounds(model)[2].network_bound == pytest.approx(exact)
    assert _jacobian_norm(model, np.ones((1, 2, 9))) == pytest.approx(exact, rel=1e-3)


@pytest.mark.parametrize("mode,pads", [("edge", [0, 2, 0, 1]), ("reflect", [0, 1, 0, 2]), ("edge", [0, -1, 0, 2]),
                                       ("constant", [0, 3, 0, -2])])
def test_pad_bound_is_above_its_norm(mode, pads):
    model = _model([helper.make_node("Pad", ["input", "p"], ["o"], name="op", mode=mode)], (5,),
                   [_init("p", pads, np.int64)])
    bound = _bounds(model)[2].network_bound
    norm = _jacobian_norm(model, np.zeros((1, 5)))
    assert norm > 0.5 and norm <= bound * (1 + 1e-4) <= 2 * norm + 1e-4


# --- Resize: the operator's exact norm ---------------------------------------------------------------

def _resize(attrs, scales=None, sizes=None, shape=(2, 4, 5)):
    inits = [_init("roi", np.zeros(0))]
    if scales is not None:
        inits.append(_init("sc", scales))
        ins = ["input", "roi", "sc"]
    else:
        inits.append(_init("sz", sizes, np.int64))
        ins = ["input", "roi", "", "sz"]
    return _model([helper.make_node("Resize", ins, ["o"], name="op", **attrs)], shape, inits)


def test_resize_nearest_2x_is_exactly_2():
    model = _resize({"mode": "nearest"}, scales=[1, 1, 2, 2])
    assert _bounds(model)[2].network_bound == pytest.approx(2.0, rel=1e-9)
    assert _jacobian_norm(model, np.zeros((1, 2, 4, 5))) == pytest.approx(2.0, rel=1e-3)


@pytest.mark.parametrize("attrs,scales,sizes", [
    ({"mode": "linear"}, [1, 1, 2, 2], None),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners", "axes": [2, 3]}, None, [7, 9]),
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, [1, 1, 1.5, 2.5], None),
    ({"mode": "cubic"}, [1, 1, 2, 1], None),
    ({"mode": "linear", "antialias": 1, "axes": [3, 2]}, None, [3, 2]),
])
def test_resize_bound_is_the_full_operator_norm(attrs, scales, sizes):
    model = _resize(attrs, scales=scales, sizes=sizes)
    if "axes" in attrs:
        model.opset_import[0].version = 18
    bound = _bounds(model)[2].network_bound
    assert bound == pytest.approx(_jacobian_norm(model, np.zeros((1, 2, 4, 5))), rel=1e-3)


def test_resize_with_computed_sizes_has_no_rule():
    nodes = [helper.make_node("Shape", ["input"], ["s"]), helper.make_node("Slice", ["s", "st", "en"], ["s2"]),
             helper.make_node("Concat", ["s2", "hw"], ["sz"], axis=0),
             helper.make_node("Resize", ["input", "", "", "sz"], ["o"], name="op", mode="nearest")]
    model = _model(nodes, (2, 4, 4), [_init("st", [0], np.int64), _init("en", [2], np.int64), _init("hw", [8, 8], np.int64)])
    bounds = _bounds(model)[2]
    assert bounds.network_bound is None and bounds.unknown_ops == ("op (Resize)",)


# --- data-dependent rules ------------------------------------------------------------------------

def _se_block(seed=0, c=4, hw=3):
    """x -> GlobalAveragePool -> Conv 1x1 (fc) -> Sigmoid -> Mul(x, s) -> Flatten -> Gemm: squeeze-excitation."""
    rng = np.random.default_rng(seed)
    inits = [_init("wse", rng.normal(0, 1, (c, c, 1, 1))), _init("bse", rng.normal(0, 0.5, c)),
             _init("wfc", rng.normal(0, 0.5, (3, c * hw * hw))), _init("bfc", np.zeros(3))]
    nodes = [helper.make_node("GlobalAveragePool", ["x0"], ["p"]),
             helper.make_node("Conv", ["p", "wse", "bse"], ["q"], name="se_fc"),
             helper.make_node("Sigmoid", ["q"], ["s"]), helper.make_node("Mul", ["x0", "s"], ["m"], name="se_mul"),
             helper.make_node("Flatten", ["m"], ["f"]), helper.make_node("Gemm", ["f", "wfc", "bfc"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", c, hw, hw])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _calibrated(model, x):
    pm, norms, _ = _bounds(model)
    found = calibrated_ranges(pm, norms, x, progress=False)
    assert found.examples == len(x)
    return pm, norms, network_bounds(pm, norms, found.ranges)


def _check_data_dependent(model, x, node, loose=None):
    without = _bounds(model)[2]
    assert without.network_bound is None and without.bound_kind is None and without.unknown_ops
    _, _, bounds = _calibrated(model, x)
    assert bounds.bound_kind == BoundKind.DATA_DEPENDENT and node in bounds.data_dependent and bounds.unknown_ops == ()
    gains = [_jacobian_norm(model, x[i:i + 1]) for i in range(len(x))]
    assert max(gains) > 1e-3 and max(gains) <= bounds.network_bound * (1 + 1e-3)  # float32 central differences
    if loose is not None:
        assert bounds.network_bound <= loose * max(gains)
    return bounds


def test_se_block_mul_is_data_dependent():
    x = np.random.default_rng(1).uniform(0, 1, (24, 4, 3, 3))
    bounds = _check_data_dependent(_se_block(), x, "se_mul (Mul)", loose=30)
    assert bounds.gain_kinds["fc"] == BoundKind.GLOBAL and bounds.gain_kinds["se_fc"] == BoundKind.DATA_DEPENDENT


def test_needs_ranges_reason():
    from laqonnx.lipschitz.registry import NEEDS_RANGES, RuleContext
    from laqonnx.lipschitz.rules_data import _mul

    pm, norms, _ = _bounds(_se_block())
    node = next(n for n in pm.model.graph.node if n.name == "se_mul")
    out = _mul(node, [1.0, 0.5], RuleContext(pm, norms))
    assert isinstance(out, NoRule) and out.reason == NEEDS_RANGES == "data-dependent: needs calibration ranges (analyze --calib DATA)"


def test_attention_matmul_of_two_activations():
    rng = np.random.default_rng(2)
    inits = [_init("wq", rng.normal(0, 0.5, (4, 4))), _init("wk", rng.normal(0, 0.5, (4, 4)))]
    nodes = [helper.make_node("MatMul", ["input", "wq"], ["q"], name="q"), helper.make_node("MatMul", ["input", "wk"], ["k"], name="k"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["sc"], name="scores"), helper.make_node("Softmax", ["sc"], ["o"], axis=-1)]
    model = _model(nodes, (1, 3, 4), inits)
    _check_data_dependent(model, rng.normal(0, 1, (16, 1, 3, 4)), "scores (MatMul)", loose=50)


def test_mul_by_a_calibrated_tensor_counts_the_broadcast():
    """Mul(x (N,2,1,1), t (N,2,4,4) = 0*x + 1): t is not perturbed but not constant either; its
    calibrated range is [1, 1] and x is copied 16 times: exactly 4 on the data (and the true gain)."""
    nodes = [helper.make_node("Unsqueeze", ["input", "ax"], ["u"]), helper.make_node("Mul", ["u", "zero"], ["u0"]),
             helper.make_node("Add", ["u0", "ones"], ["t"]), helper.make_node("Mul", ["u", "t"], ["o"], name="op")]
    model = _model(nodes, (2,), [_init("ax", [2, 3], np.int64), _init("zero", np.array(0.0)), _init("ones", np.ones((1, 2, 4, 4)))])
    bounds = _check_data_dependent(model, np.random.default_rng(9).normal(0, 1, (8, 2)), "op (Mul)")
    assert bounds.network_bound == pytest.approx(4.0, rel=1e-6)


def test_exp_is_exp_of_the_calibrated_max():
    model = _model([helper.make_node("Exp", ["input"], ["o"], name="op")], (6,))
    x = np.random.default_rng(3).normal(0, 1, (20, 6))
    bounds = _check_data_dependent(model, x, "op (Exp)")
    assert bounds.network_bound == pytest.approx(math.exp(x.max()), rel=1e-5)


def test_div_by_a_perturbed_divisor():
    nodes = [helper.make_node("Mul", ["input", "input"], ["sq"]), helper.make_node("Add", ["sq", "one"], ["den"]),
             helper.make_node("Div", ["input", "den"], ["o"], name="op")]  # x / (1 + x^2)
    model = _model(nodes, (5,), [_init("one", np.array(1.0))])
    x = np.random.default_rng(4).normal(0, 1.5, (20, 5))
    _check_data_dependent(model, x, "op (Div)", loose=60)


def test_layer_norm_global_then_tighter_on_data():
    rng = np.random.default_rng(5)
    gamma = rng.uniform(0.5, 2.0, 6)
    node = helper.make_node("LayerNormalization", ["input", "g", "b"], ["o"], name="ln", axis=-1, epsilon=1e-3)
    model = _model([node], (1, 2, 6), [_init("g", gamma), _init("b", np.zeros(6))])
    bounds = _bounds(model)[2]
    assert bounds.bound_kind == BoundKind.GLOBAL and bounds.network_bound == pytest.approx(gamma.max() / math.sqrt(1e-3))
    # near-constant rows: var ~ 0, the gain approaches max|gamma| / sqrt(eps)
    flat = np.full((1, 1, 2, 6), 0.3) + rng.normal(0, 1e-4, (1, 1, 2, 6))
    assert 0.1 * bounds.network_bound < _jacobian_norm(model, flat, h=1e-5) <= bounds.network_bound
    x = rng.normal(0, 1, (20, 1, 2, 6))
    _, _, data = _calibrated(model, x)
    assert data.bound_kind == BoundKind.DATA_DEPENDENT and data.network_bound < bounds.network_bound
    gains = [_jacobian_norm(model, x[i:i + 1]) for i in range(len(x))]
    assert max(gains) <= data.network_bound <= 10 * max(gains)


# --- an unknown bound is None, never 0 ----------------------------------------------------------

def _conv_op_gemm(op, **attrs):
    rng = np.random.default_rng(6)
    inits = [_init("w1", rng.normal(0, 0.5, (2, 1, 3, 3))), _init("w2", rng.normal(0, 0.3, (3, 2 * 4 * 4)))]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node(op, ["c"], ["h"], name="odd", **attrs), helper.make_node("Flatten", ["h"], ["f"]),
             helper.make_node("Gemm", ["f", "w2"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op", ["Hardmax", "Round", "Sign"])
def test_no_rule_on_the_path_is_none_not_zero(op, tmp_path, capsys):
    """Round/Sign used to bound to 0 (piecewise constant), printing a network bound of 0."""
    bounds = _bounds(_conv_op_gemm(op))[2]
    assert bounds.network_bound is None and bounds.bound_kind is None and bounds.unknown_ops == (f"odd ({op})",)
    assert bounds.gains["conv"] is None and bounds.gains["fc"] > 0 and bounds.upstream["fc"] is None
    path, out = tmp_path / "m.onnx", tmp_path / "a.json"
    onnx.save(_conv_op_gemm(op), str(path))
    assert main(["analyze", str(path), "--json", str(out), "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    assert doc["network_bound"] is None and doc["bound_kind"] is None and doc["layers"][0]["gain"] is None
    assert f"L2): unknown (no bound for: odd ({op}))" in capsys.readouterr().out


def test_a_branch_reading_the_perturbed_tensor_is_not_lost():
    """If(cond from the batch size) whose branches read the conv output from the outer scope: the
    If has no explicit perturbed input, but its output depends on the input: unknown, not 0."""
    model = _conv_op_gemm("Relu")
    then_g = helper.make_graph([helper.make_node("Relu", ["c"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["c"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = list(model.graph.node)
    cond = [helper.make_node("Shape", ["input"], ["shp"]), helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
            helper.make_node("Greater", ["n", "zero"], ["pos"]),
            helper.make_node("If", ["pos"], ["h"], name="branch", then_branch=then_g, else_branch=else_g)]
    del model.graph.node[:]
    model.graph.node.extend([nodes[0], *cond, *nodes[2:]])
    model.graph.initializer.append(_init("zero", np.array(0), np.int64))
    pm, _, bounds = _bounds(model)
    assert any(n.op_type == "If" for n in pm.model.graph.node)  # not folded away: the case is real
    assert bounds.network_bound is None and bounds.unknown_ops == ("branch (If)",)


def test_tensor_not_downstream_stays_zero():
    bounds = _bounds(_conv_op_gemm("Relu"))[2]
    pm = load_model(_conv_op_gemm("Relu"))
    assert bounds.network_bound > 0 and bounds.upstream["conv"] == 1.0
    from laqonnx.lipschitz.network import _propagate
    from laqonnx.lipschitz.registry import RuleContext

    walk = _propagate(pm, "h", RuleContext(pm, {"conv": 1.0, "fc": 1.0}), {}, {})
    assert walk.bounds.get("c", 0.0) == 0.0  # upstream of the perturbation: not downstream, 0


# --- analyze API and CLI --------------------------------------------------------------------------

def test_analyze_with_calib_array_records_the_kind():
    x = np.random.default_rng(7).uniform(0, 1, (16, 4, 3, 3)).astype(np.float32)
    a = analyze(_se_block(), progress=False, calib=x)
    doc = a.to_json()
    assert doc["bound_kind"] == "data-dependent" and doc["data_dependent"] == ["se_mul (Mul)"]
    assert doc["calibration_examples"] == 16 and math.isfinite(doc["network_bound"])
    plain = analyze(_se_block(), progress=False).to_json()
    assert plain["network_bound"] is None and plain["bound_kind"] is None and plain["calibration_examples"] is None


def test_cli_calib_prints_a_data_dependent_bound(tmp_path, capsys):
    path, data, out = tmp_path / "se.onnx", tmp_path / "calib.npz", tmp_path / "a.json"
    onnx.save(_se_block(), str(path))
    np.savez(data, x=np.random.default_rng(8).uniform(0, 1, (32, 4, 3, 3)).astype(np.float32))
    assert main(["analyze", str(path), "--calib", str(data), "--calib-size", "20", "--json", str(out), "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    stdout = capsys.readouterr().out
    assert doc["bound_kind"] == "data-dependent" and doc["calibration_examples"] == 20
    assert f"{doc['network_bound']:.4g}, data-dependent (on the calibration data)" in stdout


@pytest.mark.parametrize("args,needle", [(["--calib", "nope/missing.npz"], "missing.npz"),
                                         (["--calib-size", "4"], "need --calib"),
                                         (["--calib", "CAL", "--input-range=1,0"], "invalid range")])
def test_cli_bad_calib_is_one_line_exit_2(args, needle, tmp_path, capsys):
    path = tmp_path / "se.onnx"
    onnx.save(_se_block(), str(path))
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 4, 3, 3), np.float32))
    argv = ["analyze", str(path), *[str(tmp_path / "c.npz") if a == "CAL" else a for a in args], "--no-progress"]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses the option value itself
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err.splitlines()[-1]
    if "--input-range=1,0" not in args:  # argparse prints its usage line first
        assert len(err.splitlines()) == 1
