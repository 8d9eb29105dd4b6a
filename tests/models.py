"""Tiny ONNX models built in memory with onnx.helper, shared by the tests.

Every builder is seeded, has a dynamic batch axis named ``N``, input ``input`` in [0, 1] and output
``logits``. Add builders here rather than copying them into test files.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _model(nodes, inits, in_shape, out_dim, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def cnn(seed: int = 0, in_ch: int = 1, hw: int = 8, classes: int = 10, bn: bool = False) -> onnx.ModelProto:
    """Conv(3x3,pad1) [-> BN] -> Relu -> Conv(3x3,stride2,pad1) -> Relu -> Flatten -> Gemm(transB)."""
    rng = np.random.default_rng(seed)
    c1, c2 = 8, 16
    inits = [
        _init("w1", rng.normal(0, 0.4, (c1, in_ch, 3, 3))),
        _init("b1", rng.normal(0, 0.1, c1)),
        _init("w2", rng.normal(0, 0.15, (c2, c1, 3, 3))),
        _init("b2", rng.normal(0, 0.1, c2)),
    ]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    x = "c1"
    if bn:
        inits += [
            _init("bn_s", rng.uniform(0.5, 1.5, c1)),
            _init("bn_b", rng.normal(0, 0.1, c1)),
            _init("bn_m", rng.normal(0, 0.2, c1)),
            _init("bn_v", rng.uniform(0.5, 2.0, c1)),
        ]
        nodes.append(
            helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn1"], name="bn1", epsilon=1e-5)
        )
        x = "bn1"
    half = (hw + 1) // 2
    inits += [
        _init("w3", rng.normal(0, 0.05, (classes, c2 * half * half))),
        _init("b3", rng.normal(0, 0.1, classes)),
    ]
    nodes += [
        helper.make_node("Relu", [x], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, inits, [in_ch, hw, hw], classes, "cnn")


def residual(seed: int = 0, ch: int = 4, hw: int = 6, classes: int = 5) -> onnx.ModelProto:
    """Conv -> Relu -> [Conv -> Relu -> Conv] + skip -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w0", rng.normal(0, 0.5, (ch, 1, 3, 3))),
        _init("wa", rng.normal(0, 0.3, (ch, ch, 3, 3))),
        _init("wb", rng.normal(0, 0.3, (ch, ch, 3, 3))),
        _init("wf", rng.normal(0, 0.5, (classes, ch))),
        _init("bf", np.zeros(classes)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["s0"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "r0"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["rs"], name="relu_sum"),
        helper.make_node("GlobalAveragePool", ["rs"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, inits, [1, hw, hw], classes, "residual")


def concat(seed: int = 0, hw: int = 6, classes: int = 4) -> onnx.ModelProto:
    """Two conv branches (one 3x3, one dilated 3x3) concatenated on channels, then MatMul + Add."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("wl", rng.normal(0, 0.5, (3, 1, 3, 3))),
        _init("wr", rng.normal(0, 0.5, (2, 1, 3, 3))),
        _init("wm", rng.normal(0, 0.2, (5 * hw * hw, classes))),
        _init("bm", rng.normal(0, 0.1, classes)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "wl"], ["l"], name="left", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["input", "wr"], ["r"], name="right", pads=[2, 2, 2, 2], dilations=[2, 2]),
        helper.make_node("Concat", ["l", "r"], ["cat"], name="concat", axis=1),
        helper.make_node("Relu", ["cat"], ["rc"], name="relu"),
        helper.make_node("Flatten", ["rc"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "wm"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "bm"], ["logits"], name="bias"),
    ]
    return _model(nodes, inits, [1, hw, hw], classes, "concat")


def random_input(model_or_shape, n: int = 4, seed: int = 0) -> np.ndarray:
    """Inputs in [0, 1] for a model built here (or a (C, H, W) shape)."""
    if isinstance(model_or_shape, onnx.ModelProto):
        dims = model_or_shape.graph.input[0].type.tensor_type.shape.dim[1:]
        shape = tuple(d.dim_value for d in dims)
    else:
        shape = tuple(model_or_shape)
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(np.float32)


def mlp(seed: int = 0, dims: tuple[int, ...] = (16, 12, 8, 5)) -> onnx.ModelProto:
    """A chain of Gemm(transB) layers with Relu between them, input ``(N, dims[0])``."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        inits += [_init(f"w{i}", rng.normal(0, 1 / np.sqrt(a), (b, a))), _init(f"b{i}", rng.normal(0, 0.1, b))]
        out = "logits" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out], name=f"fc{i}", transB=1))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", dims[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", dims[-1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
