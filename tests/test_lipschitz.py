"""Operator norms against explicit operator matrices from onnxruntime; network bounds against
empirical Lipschitz estimates and exact linear cases; unknown ops."""

from __future__ import annotations

import dataclasses

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from laqonnx.graph import load_model
from laqonnx.lipschitz import network_bounds, operator_norm
from tests import models


def _out(name: str, rank: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"d{i}" for i in range(rank)])


def _single(op: str, in_shape, w: np.ndarray, extra_nodes=(), out_name="y", **attrs) -> onnx.ModelProto:
    """input (N, *in_shape) -> op(weight) [-> extra nodes] ; output ``out_name``."""
    nodes = [helper.make_node(op, ["input", "w"], ["y"], name="layer", **attrs), *extra_nodes]
    graph = helper.make_graph(
        nodes, "single",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])],
        [_out(out_name, 1 + len(in_shape))],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _explicit_sigma(model: onnx.ModelProto, in_shape) -> float:
    """Largest singular value of the model's (linear) map, from onnxruntime on the basis vectors."""
    n = int(np.prod(in_shape))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    eye = np.eye(n, dtype=np.float32).reshape(n, *in_shape)
    zero = sess.run(None, {"input": np.zeros((1, *in_shape), np.float32)})[0].reshape(1, -1)
    m = sess.run(None, {"input": eye})[0].reshape(n, -1) - zero  # remove any bias
    return float(np.linalg.svd(m.astype(np.float64), compute_uv=False)[0])


rng = np.random.default_rng(0)

CONV_CASES = {
    "stride1-pad1": ("Conv", (3, 6, 6), (4, 3, 3, 3), dict(pads=[1, 1, 1, 1])),
    "stride2-pad1": ("Conv", (3, 7, 7), (4, 3, 3, 3), dict(pads=[1, 1, 1, 1], strides=[2, 2])),
    "asym-pads": ("Conv", (2, 6, 5), (3, 2, 3, 2), dict(pads=[0, 1, 2, 0], strides=[1, 2])),
    "no-pad": ("Conv", (2, 6, 6), (3, 2, 3, 3), dict()),
    "dilation2": ("Conv", (2, 8, 8), (3, 2, 3, 3), dict(pads=[2, 2, 2, 2], dilations=[2, 2])),
    "groups2": ("Conv", (4, 6, 6), (6, 2, 3, 3), dict(pads=[1, 1, 1, 1], group=2)),
    "depthwise-stride2": ("Conv", (4, 7, 7), (4, 1, 3, 3), dict(pads=[1, 1, 1, 1], group=4, strides=[2, 2])),
    "same-upper-stride2": ("Conv", (2, 8, 8), (3, 2, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "same-lower": ("Conv", (2, 7, 7), (3, 2, 4, 4), dict(auto_pad="SAME_LOWER")),
    "valid": ("Conv", (2, 7, 7), (3, 2, 3, 3), dict(auto_pad="VALID", strides=[2, 2])),
    "conv1d": ("Conv", (3, 12), (4, 3, 5), dict(pads=[2, 1], strides=[2])),
    "conv3d": ("Conv", (2, 4, 4, 4), (2, 2, 3, 3, 3), dict(pads=[1, 1, 1, 1, 1, 1])),
    "convT-stride2": ("ConvTranspose", (3, 5, 5), (3, 2, 3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])),
    "convT-groups-asym": ("ConvTranspose", (4, 4, 4), (4, 1, 3, 2), dict(group=2, pads=[0, 1, 1, 0], strides=[2, 1])),
    "convT-same-upper": ("ConvTranspose", (2, 4, 4), (2, 3, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "convT-1d-dilated": ("ConvTranspose", (2, 9), (2, 3, 3), dict(dilations=[2], pads=[1, 2])),
    # 8 x 24 x 24 = 4608 input elements: above the explicit-SVD limit, so Lanczos iteration
    "lanczos-stride2": ("Conv", (8, 24, 24), (8, 8, 3, 3), dict(pads=[1, 1, 1, 1], strides=[2, 2])),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_operator_norm_matches_explicit_operator(case):
    op, in_shape, w_shape, attrs = CONV_CASES[case]
    w = np.random.default_rng(len(case)).normal(0, 0.5, w_shape)
    model = _single(op, in_shape, w, **attrs)
    pm = load_model(model)
    (layer,) = pm.layers
    norm = operator_norm(layer, pm.weight(layer))
    expected = _explicit_sigma(model, in_shape)
    assert norm.value == pytest.approx(expected, rel=1e-3)
    assert norm.method == ("lanczos" if case.startswith("lanczos") else "svd")
    if case.startswith("lanczos"):
        assert 1 <= norm.iterations <= 500
        # a warm start from the float vector converges on a perturbed weight in fewer steps
        w2 = pm.weight(layer) * (1 + 0.01 * np.random.default_rng(1).standard_normal(w_shape)).astype(np.float32)
        cold = operator_norm(layer, w2, init=np.random.default_rng(0).standard_normal(int(np.prod(in_shape))))
        warm = operator_norm(layer, w2, init=norm.vector)
        assert warm.value == pytest.approx(cold.value, rel=1e-3)
        assert warm.iterations < cold.iterations


@pytest.mark.parametrize("case", ["stride1-pad1", "stride2-pad1", "dilation2", "groups2", "conv1d", "convT-stride2"])
def test_reshaped_bound_without_shape_is_an_upper_bound(case):
    op, in_shape, w_shape, attrs = CONV_CASES[case]
    w = np.random.default_rng(len(case)).normal(0, 0.5, w_shape)
    model = _single(op, in_shape, w, **attrs)
    pm = load_model(model)
    layer = dataclasses.replace(pm.layers[0], input_shape=None)
    bound = operator_norm(layer, pm.weight(layer))
    assert bound.method == "reshaped-bound" and "input shape is unknown" in bound.note
    assert bound.value >= _explicit_sigma(model, in_shape) * (1 - 1e-6)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha", [1.0, -0.5])
def test_gemm_norm_is_spectral_norm(trans_b, alpha):
    w = rng.normal(0, 1, (7, 5) if trans_b else (5, 7))
    model = _single("Gemm", (5,), w, transB=trans_b, alpha=alpha)
    pm = load_model(model)
    norm = operator_norm(pm.layers[0], pm.weight(pm.layers[0]))
    assert norm.value == pytest.approx(abs(alpha) * np.linalg.norm(w, 2), rel=1e-6)
    assert norm.value == pytest.approx(_explicit_sigma(model, (5,)), rel=1e-5)


def test_matmul_norm_is_spectral_norm():
    w = rng.normal(0, 1, (6, 3))
    model = _single("MatMul", (4, 6), w)  # batched rows: (N, 4, 6) @ (6, 3)
    pm = load_model(model)
    layer = pm.layers[0]
    assert layer.channel_axis == 1
    assert operator_norm(layer, pm.weight(layer)).value == pytest.approx(np.linalg.norm(w, 2), rel=1e-6)
    assert operator_norm(layer, pm.weight(layer)).value == pytest.approx(_explicit_sigma(model, (4, 6)), rel=1e-5)


# ---------------------------------------------------------------- network bounds


def _norms(pm):
    return {layer.name: operator_norm(layer, pm.weight(layer)).value for layer in pm.layers}


def _torch_forward(model: onnx.ModelProto):
    """An independent torch reimplementation of the small float graphs used here (no onnxruntime)."""
    inits = {t.name: torch.tensor(numpy_helper.to_array(t), dtype=torch.float64) for t in model.graph.initializer}
    F = torch.nn.functional

    def run(x: torch.Tensor) -> torch.Tensor:
        env = {"input": x}
        for node in model.graph.node:
            a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
            ins = [env[n] if n in env else inits[n] for n in node.input if n]
            if node.op_type == "Conv":
                p = a.get("pads", [0, 0, 0, 0])
                y = F.conv2d(F.pad(ins[0], [p[1], p[3], p[0], p[2]]), ins[1], ins[2] if len(ins) > 2 else None,
                             stride=a.get("strides", [1, 1]), dilation=a.get("dilations", [1, 1]))
            elif node.op_type == "Relu":
                y = F.relu(ins[0])
            elif node.op_type == "Add":
                y = ins[0] + ins[1]
            elif node.op_type == "Concat":
                y = torch.cat(ins, dim=a["axis"])
            elif node.op_type == "GlobalAveragePool":
                y = ins[0].mean(dim=(2, 3), keepdim=True)
            elif node.op_type == "Flatten":
                y = ins[0].flatten(1)
            elif node.op_type == "MatMul":
                y = ins[0] @ ins[1]
            elif node.op_type == "Gemm":
                b = ins[1].T if a.get("transB") else ins[1]
                y = ins[0] @ b + (ins[2] if len(ins) > 2 else 0)
            else:
                raise AssertionError(node.op_type)
            env[node.output[0]] = y
        return env[model.graph.output[0].name]

    return run


def _empirical_lipschitz(f, shape, seed: int = 0, pairs: int = 8, steps: int = 40) -> float:
    """max ||f(x)-f(y)|| / ||x-y|| over pairs found by gradient ascent, and max local Jacobian norm."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((pairs, *shape), generator=g, dtype=torch.float64).requires_grad_(True)
    d = (1e-2 * torch.randn((pairs, *shape), generator=g, dtype=torch.float64)).requires_grad_(True)
    opt = torch.optim.Adam([x, d], lr=1e-2)
    best = 0.0
    for _ in range(steps):
        ratio = (f(x + d) - f(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
        best = max(best, float(ratio.detach().max()))
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    for i in range(4):
        jac = torch.autograd.functional.jacobian(f, x[i:i + 1].detach()).reshape(-1, int(np.prod(shape)))
        best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
    return best


@pytest.mark.parametrize("build", [models.residual, models.concat, models.cnn])
def test_network_bound_is_above_empirical_lipschitz(build):
    model = build()
    f = _torch_forward(model)
    x = models.random_input(model, n=2)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(f(torch.tensor(x, dtype=torch.float64)).detach().numpy(), sess.run(None, {"input": x})[0], atol=1e-4)
    pm = load_model(model)
    bounds = network_bounds(pm, _norms(pm))
    empirical = _empirical_lipschitz(f, x.shape[1:])
    assert bounds.network_bound is not None and bounds.unknown_ops == ()
    assert bounds.network_bound >= empirical
    assert empirical > 0.01 * bounds.network_bound  # a real estimate, not a degenerate 0


def _linear_chain(n_layers: int) -> onnx.ModelProto:
    g = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["input", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(g.normal(0, 0.5, (3, 2, 3, 3)).astype(np.float32), "w0")]
    last = "c0"
    if n_layers > 1:
        nodes += [
            helper.make_node("Conv", ["c0", "w1"], ["c1"], name="conv1", strides=[2, 2]),
            helper.make_node("Flatten", ["c1"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "w2"], ["fc"], name="fc", transB=1),
        ]
        inits += [numpy_helper.from_array(g.normal(0, 0.5, (4, 3, 2, 2)).astype(np.float32), "w1"),
                  numpy_helper.from_array(g.normal(0, 0.3, (5, 36)).astype(np.float32), "w2")]
        last = "fc"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 6, 6])],
                              [_out(last, 2 if last == "fc" else 4)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_linear_chain_bound_is_product_of_norms_and_single_layer_is_attained():
    chain = _linear_chain(3)
    pm = load_model(chain)
    norms = _norms(pm)
    bounds = network_bounds(pm, norms)
    assert bounds.network_bound == pytest.approx(np.prod(list(norms.values())), rel=1e-12)
    assert bounds.network_bound >= _explicit_sigma(chain, (2, 6, 6))
    assert bounds.gains["conv0"] == pytest.approx(norms["conv1"] * norms["fc"], rel=1e-12)
    assert bounds.upstream["fc"] == pytest.approx(norms["conv0"] * norms["conv1"], rel=1e-12)
    single = _linear_chain(1)
    pm1 = load_model(single)
    b1 = network_bounds(pm1, _norms(pm1))
    assert b1.network_bound == pytest.approx(_explicit_sigma(single, (2, 6, 6)), rel=1e-3)


def _op_after_identity_matmul(op_node, in_shape, extra_inits=()):
    """input -> op -> Flatten -> MatMul(identity): the network bound is the op's rule alone."""
    sess_model = helper.make_model(helper.make_graph(
        [op_node], "probe", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])],
        [_out("o", 1 + len(in_shape))], initializer=list(extra_inits)),
        opset_imports=[helper.make_opsetid("", 17)])
    sess_model.ir_version = 8
    out = ort.InferenceSession(sess_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.zeros((1, *in_shape), np.float32)})[0]
    n_out = int(np.prod(out.shape[1:]))
    nodes = [op_node, helper.make_node("Flatten", ["o"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "eye"], ["logits"], name="mm")]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])],
                              [_out("logits", 2)],
                              initializer=[*extra_inits, numpy_helper.from_array(np.eye(n_out, dtype=np.float32), "eye")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


C = numpy_helper.from_array(np.array([[[[0.5]], [[-3.0]]]], np.float32), "c")
RULE_CASES = {
    "sigmoid": (helper.make_node("Sigmoid", ["input"], ["o"], name="op"), (2, 3, 3), (), 0.25),
    "leaky-alpha2": (helper.make_node("LeakyRelu", ["input"], ["o"], name="op", alpha=2.0), (2, 3, 3), (), 2.0),
    "mul-const": (helper.make_node("Mul", ["input", "c"], ["o"], name="op"), (2, 3, 3), (C,), 3.0),
    "div-const": (helper.make_node("Div", ["input", "c"], ["o"], name="op"), (2, 3, 3), (C,), 2.0),
    "add-const": (helper.make_node("Add", ["c", "input"], ["o"], name="op"), (2, 3, 3), (C,), 1.0),
    "concat-self": (helper.make_node("Concat", ["input", "input"], ["o"], name="op", axis=1), (2, 3, 3), (), np.sqrt(2)),
    "maxpool-overlap": (helper.make_node("MaxPool", ["input"], ["o"], name="op", kernel_shape=[3, 3], strides=[2, 2]), (1, 7, 7), (), np.sqrt(4)),
    "maxpool-disjoint": (helper.make_node("MaxPool", ["input"], ["o"], name="op", kernel_shape=[2, 2], strides=[2, 2]), (1, 6, 6), (), 1.0),
    "gap": (helper.make_node("GlobalAveragePool", ["input"], ["o"], name="op"), (2, 4, 5), (), "explicit"),
    "avgpool-overlap": (helper.make_node("AveragePool", ["input"], ["o"], name="op", kernel_shape=[3, 3], strides=[1, 1]), (1, 6, 6), (), "explicit"),
    "avgpool-pads": (helper.make_node("AveragePool", ["input"], ["o"], name="op", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), (2, 7, 7), (), "explicit"),
    "avgpool-include-pad": (helper.make_node("AveragePool", ["input"], ["o"], name="op", kernel_shape=[2, 3], strides=[2, 1], pads=[0, 1, 1, 1], count_include_pad=1), (1, 5, 6), (), "explicit"),
}


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_op_rules(case):
    node, in_shape, inits, expected = RULE_CASES[case]
    model = _op_after_identity_matmul(node, in_shape, inits)
    pm = load_model(model)
    bound = network_bounds(pm, _norms(pm)).network_bound
    if expected == "explicit":  # linear ops: the bound is the exact operator norm
        expected = _explicit_sigma(model, in_shape)
    assert bound == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("kind", ["Hardmax", "custom"])
def test_unknown_op_makes_downstream_unknown_and_names_it(kind):
    model = models.cnn()
    nodes = list(model.graph.node)
    i = [n.name for n in nodes].index("relu2")
    if kind == "Hardmax":
        odd = helper.make_node("Hardmax", ["c2"], ["r2"], name="odd")
    else:
        odd = helper.make_node("Swish", ["c2"], ["r2"], name="odd", domain="com.example")
        model.opset_import.append(helper.make_opsetid("com.example", 1))
    nodes[i] = odd
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    pm = load_model(model)
    bounds = network_bounds(pm, _norms(pm))
    assert bounds.network_bound is None
    assert len(bounds.unknown_ops) == 1 and bounds.unknown_ops[0].startswith("odd (")
    assert bounds.gains["conv1"] is None and bounds.gains["conv2"] is None
    assert bounds.gains["fc"] == 1.0 and bounds.upstream["conv2"] is not None and bounds.upstream["fc"] is None


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_explicit_adjoint_matches_autograd(case):
    from laqonnx.lipschitz.maps import _conv_adjoint, _conv_map

    op, in_shape, w_shape, attrs = CONV_CASES[case]
    w = np.random.default_rng(len(case)).normal(0, 0.5, w_shape)
    pm = load_model(_single(op, in_shape, w, **attrs))
    layer = pm.layers[0]
    wt = torch.tensor(pm.weight(layer), dtype=torch.float64)
    fn, adj = _conv_map(torch, layer, wt), _conv_adjoint(torch, layer, wt)
    x = torch.randn((1, *in_shape), dtype=torch.float64, requires_grad=True)
    y = fn(x)
    z = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, grad_outputs=z)
    got = adj(z)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_conv_transpose_output_shape_attribute():
    # explicit output_shape without auto_pad: ONNX puts the extra padding first
    w = np.random.default_rng(5).normal(0, 0.5, (2, 3, 3, 3))
    model = _single("ConvTranspose", (2, 4, 4), w, strides=[2, 2], output_shape=[8, 8])
    pm = load_model(model)
    layer = pm.layers[0]
    assert layer.attrs["pads"] == (1, 1, 0, 0)
    assert layer.output_shape == (1, 3, 8, 8)
    assert operator_norm(layer, pm.weight(layer)).value == pytest.approx(_explicit_sigma(model, (2, 4, 4)), rel=1e-3)


WARM_CASES = {
    "stride1": ("Conv", (8, 40, 40), (8, 8, 3, 3), dict(pads=[1, 1, 1, 1])),
    "stride2": ("Conv", (16, 40, 40), (16, 16, 3, 3), dict(pads=[1, 1, 1, 1], strides=[2, 2])),
    "7x7-stride2-asym": ("Conv", (3, 60, 52), (6, 3, 7, 7), dict(pads=[3, 2, 3, 1], strides=[2, 2])),
    "conv1d-dilated": ("Conv", (4, 600), (4, 4, 5), dict(pads=[4, 4], dilations=[2])),
}


CIRCULAR_CASES = {  # (channels in, out, groups), kernel, stride, dilation, shift, period
    "3x3": ((4, 6, 1), (3, 3), (1, 1), (1, 1), (1, 1), (8, 8)),
    "7x7-stride2": ((3, 5, 1), (7, 7), (2, 2), (1, 1), (3, 3), (16, 16)),
    "dilated-grouped": ((4, 4, 2), (3, 3), (1, 2), (1, 2), (1, 2), (6, 8)),
    "1d-stride3": ((2, 3, 1), (4,), (3,), (1,), (2,), (9,)),
}


@pytest.mark.parametrize("case", list(CIRCULAR_CASES))
def test_circular_conv_and_its_explicit_adjoint(case):
    """The warm start's circular conv equals the definition y[o] = sum_k w[k] x[(o s + k d - shift) mod m],
    evaluated independently with numpy index arithmetic, and its adjoint equals autograd."""
    import itertools

    from laqonnx.lipschitz.maps import _circular_conv

    (cin, cout, groups), kernel, strides, dil, shifts, periods = CIRCULAR_CASES[case]
    rng = np.random.default_rng(7)
    w = rng.normal(0, 1, (cout, cin // groups, *kernel))
    x = rng.normal(0, 1, (1, cin, *periods))
    fwd, adj = _circular_conv(torch, torch.tensor(w), shifts, periods, strides, dil, groups)
    got = fwd(torch.tensor(x)).numpy()
    outs = [m // s for m, s in zip(periods, strides)]
    assert got.shape == (1, cout, *outs)
    expected = np.zeros_like(got)
    per_in, per_out = cin // groups, cout // groups
    for o in itertools.product(*map(range, outs)):
        for k in itertools.product(*map(range, kernel)):
            src = tuple((oi * s + ki * d - sh) % m for oi, s, ki, d, sh, m in zip(o, strides, k, dil, shifts, periods))
            for c in range(cout):
                g = c // per_out
                expected[(0, c, *o)] += w[(c, slice(None), *k)] @ x[(0, slice(g * per_in, (g + 1) * per_in), *src)]
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    xt = torch.tensor(x, requires_grad=True)
    z = torch.randn(got.shape, dtype=torch.float64)
    (reference,) = torch.autograd.grad(fwd(xt), xt, grad_outputs=z)
    torch.testing.assert_close(adj(z), reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", list(WARM_CASES))
def test_periodic_warm_start_matches_cold_start_in_fewer_steps(case):
    """Large convs start Lanczos from a tiled circular-problem solution: same norm, fewer full-size steps."""
    op, in_shape, w_shape, attrs = WARM_CASES[case]
    w = np.random.default_rng(len(case)).normal(0, 0.5, w_shape)
    pm = load_model(_single(op, in_shape, w, **attrs))
    (layer,) = pm.layers
    weight = pm.weight(layer)
    random_start = np.random.default_rng(0).standard_normal(int(np.prod(in_shape)))
    tol = 1e-4
    reference = operator_norm(layer, weight, init=random_start, tol=1e-5, max_iter=1000)
    cold = operator_norm(layer, weight, init=random_start, tol=tol)
    warm = operator_norm(layer, weight, tol=tol)
    assert warm.method == cold.method == "lanczos"
    assert warm.value <= reference.value * (1 + 1e-6)  # a Ritz value: never above the true norm
    assert warm.value == pytest.approx(reference.value, rel=tol)
    assert warm.value == pytest.approx(cold.value, rel=tol)
    assert warm.iterations < cold.iterations
    # the returned vector attains the norm at the real input shape
    x = torch.tensor(warm.vector[None], dtype=torch.float64)
    sess = ort.InferenceSession(pm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x.numpy().astype(np.float32)})[0] - sess.run(None, {"input": np.zeros_like(x.numpy(), dtype=np.float32)})[0]
    assert float(np.linalg.norm(out) / np.linalg.norm(warm.vector)) == pytest.approx(warm.value, rel=1e-3)


@pytest.mark.parametrize("load,threads_inside", [(0.0, 2), (0.3, 2), (1.0, 1), (99.0, 1)])
def test_conv_norm_pins_blas_and_runs_torch_single_threaded_only_on_a_busy_machine(monkeypatch, load, threads_inside):
    from threadpoolctl import threadpool_info, threadpool_limits

    import laqonnx._util.threads as thr
    import laqonnx.lipschitz.solvers as lip

    before = torch.get_num_threads()
    seen, blas = [], []
    monkeypatch.setattr(thr, "others_cores", lambda: load)  # cores other processes keep busy
    monkeypatch.setattr(thr.os, "cpu_count", lambda: 2)
    real = lip._lanczos_sigma

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        blas.extend(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
        return real(*a, **k)

    monkeypatch.setattr(lip, "_lanczos_sigma", spy)
    op, in_shape, w_shape, attrs = CONV_CASES["lanczos-stride2"]
    pm = load_model(_single(op, in_shape, np.random.default_rng(0).normal(0, 0.5, w_shape), **attrs))
    torch.set_num_threads(2)
    try:
        with threadpool_limits(2, user_api="blas"):
            operator_norm(pm.layers[0], pm.weight(pm.layers[0]))
            assert seen and set(seen) == {threads_inside}
            assert blas and set(blas) == {1}  # BLAS pinned while torch works
            assert torch.get_num_threads() == 2  # restored
            assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} == {2}
    finally:
        torch.set_num_threads(before)


def test_compute_threads_nested_keeps_blas_pinned_and_limits_it_once(monkeypatch):
    """A nested compute_threads (an operator norm inside scoring) does not re-limit BLAS, sets
    torch's count only when it asks for one, and everything is restored on the way out."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import laqonnx._util.threads as thr

    def blas():
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    limits = []
    real = thr._one_blas_thread
    monkeypatch.setattr(thr, "_one_blas_thread", lambda: limits.append(1) or real())
    monkeypatch.setattr(thr, "others_cores", lambda: 0.0)
    monkeypatch.setattr(thr.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(2, user_api="blas"):
            with thr.compute_threads():
                assert blas() == {1} and torch.get_num_threads() == 2
                with thr.compute_threads():
                    assert blas() == {1} and torch.get_num_threads() == 2
                with thr.compute_threads(1):
                    assert blas() == {1} and torch.get_num_threads() == 1
                assert blas() == {1} and torch.get_num_threads() == 2
            assert limits == [1]
            assert blas() == {2} and torch.get_num_threads() == 2
            with thr.compute_threads():  # a later outermost call limits again
                assert blas() == {1}
            assert limits == [1, 1] and blas() == {2}

            def held():  # a context kept open across a yield, closed after the outer one
                with thr.compute_threads():
                    yield

            outer = thr.compute_threads()
            outer.__enter__()
            gen = held()
            next(gen)
            outer.__exit__(None, None, None)
            gen.close()
            with thr.compute_threads():  # still counted right: this one is outermost again
                assert blas() == {1}
            assert limits == [1, 1, 1, 1]
    finally:
        torch.set_num_threads(before)


def test_others_cores_counts_other_processes_not_this_one(monkeypatch):
    """Measured from /proc: a spinning child process shows as about one busy core; this process's
    own spinning thread does not (the 1-minute load average counted both)."""
    import subprocess
    import sys
    import threading
    import time

    import laqonnx._util.threads as thr

    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc")
    monkeypatch.setattr(thr, "_REUSE_S", 0.0)
    monkeypatch.setattr(thr, "_WINDOW_S", 0.5)
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert thr.others_cores() >= 0.6
    finally:
        child.kill()
        child.wait()

    def sample(spinning: bool) -> float:
        stop = threading.Event()

        def spin():
            while not stop.is_set():
                pass

        t = threading.Thread(target=spin)
        if spinning:
            t.start()
        try:
            return thr.others_cores()
        finally:
            stop.set()
            if spinning:
                t.join()

    # interleaved with and without our own spinning thread: the same reading (whatever else runs here)
    spin, quiet = zip(*[(sample(True), sample(False)) for _ in range(3)])
    assert sorted(spin)[1] < sorted(quiet)[1] + 0.5, (spin, quiet)
    monkeypatch.setattr(thr, "others_cores", lambda: None)  # no /proc: the load average
    monkeypatch.setattr(thr.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    monkeypatch.setattr(thr.os, "cpu_count", lambda: 4)
    assert thr.free_cores() == 3 and not thr.machine_busy()
    monkeypatch.setattr(thr.os, "getloadavg", lambda: (7.0, 0.0, 0.0))
    assert thr.free_cores() == 1 and thr.machine_busy()


@pytest.mark.parametrize("case", ["conv", "gemm-transB", "matmul"])
def test_image_norm_is_the_gain_on_one_vector_as_onnxruntime_computes_it(case):
    from laqonnx.lipschitz import image_norm

    r = np.random.default_rng(11)
    if case == "conv":
        model = _single("Conv", (3, 9, 7), r.normal(0, 0.5, (4, 3, 3, 3)), pads=[1, 0, 1, 2], strides=[2, 1])
        in_shape = (3, 9, 7)
    elif case == "gemm-transB":
        model, in_shape = _single("Gemm", (6,), r.normal(0, 0.5, (5, 6)), transB=1, alpha=-1.5), (6,)
    else:
        model, in_shape = _single("MatMul", (6,), r.normal(0, 0.5, (6, 4))), (6,)
    pm = load_model(model)
    (layer,) = pm.layers
    v = r.normal(0, 1, in_shape)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": v[None].astype(np.float32)})[0] - sess.run(None, {"input": np.zeros((1, *in_shape), np.float32)})[0]
    expected = float(np.linalg.norm(y) / np.linalg.norm(v))
    got = image_norm(layer, pm.weight(layer), v)
    assert got == pytest.approx(expected, rel=1e-5)
    assert image_norm(layer, pm.weight(layer), 3 * v) == pytest.approx(got, rel=1e-12)  # scale-free
    with pytest.raises(ValueError, match="nonzero"):
        image_norm(layer, pm.weight(layer), np.zeros(in_shape))
    with pytest.raises(ValueError, match="elements"):
        image_norm(layer, pm.weight(layer), np.ones(int(np.prod(in_shape)) + 1))


POINTWISE_CASES = {
    "1x1": ((6, 5, 5), (4, 6, 1, 1), {}),
    "1x1-stride2-pad": ((3, 7, 6), (5, 3, 1, 1), dict(strides=[2, 3], pads=[1, 2, 0, 1])),
    "1x1-groups": ((6, 4, 4), (9, 2, 1, 1), dict(group=3)),
    "1x1-conv1d": ((4, 9), (3, 4, 1), dict(strides=[2], pads=[1, 1])),
    # 96 x 8 x 8 = 6144 inputs: would otherwise need Lanczos
    "1x1-wide": ((96, 8, 8), (80, 96, 1, 1), dict(strides=[2, 2])),
}


@pytest.mark.parametrize("case", list(POINTWISE_CASES))
def test_pointwise_conv_norm_is_exact_from_the_weight_matrix(case):
    in_shape, w_shape, attrs = POINTWISE_CASES[case]
    w = np.random.default_rng(len(case)).normal(0, 0.5, w_shape)
    model = _single("Conv", in_shape, w, **attrs)
    pm = load_model(model)
    (layer,) = pm.layers
    norm = operator_norm(layer, pm.weight(layer))
    assert norm.method == "spectral" and norm.iterations == 0
    if int(np.prod(in_shape)) <= 4096:  # the explicit operator from onnxruntime basis vectors
        assert norm.value == pytest.approx(_explicit_sigma(model, in_shape), rel=1e-5)
    else:
        lanczos = linear_map_norm_of(layer, pm.weight(layer))
        assert norm.value == pytest.approx(lanczos, rel=1e-4) and norm.value >= lanczos * (1 - 1e-6)
    # the vector attains the norm through onnxruntime
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": norm.vector[None].astype(np.float32)})[0]
    assert float(np.linalg.norm(y) / np.linalg.norm(norm.vector)) == pytest.approx(norm.value, rel=1e-5)


def linear_map_norm_of(layer, weight) -> float:
    """The conv's norm by Lanczos on the conv map itself (no 1x1 shortcut), converged tightly."""
    from laqonnx.lipschitz import maps, solvers

    t = torch
    shape = (1, *layer.input_shape[1:])
    return solvers.linear_map_norm(
        lambda dtype: maps._conv_map(t, layer, t.tensor(np.asarray(weight), dtype=dtype)), shape, tol=1e-7, max_iter=2000,
        seed=0, init=None, adjoint_builder=lambda dtype: maps._conv_adjoint(t, layer, t.tensor(np.asarray(weight), dtype=dtype)),
    ).value
