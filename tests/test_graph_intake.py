"""Graph intake: each pass on tiny handmade models, the reader, the session helpers, and the real
classifiers exported by others (/work/shared/real-models)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from laqonnx.errors import DataError, ModelError
from laqonnx.graph import load_model, open_session, read_model, remove_unused, run_batched, run_passes
from laqonnx.graph.batchnorm import FoldBatchNorm
from laqonnx.graph.constants import fold_constants, lift_constants
from laqonnx.graph.passes import IRPass, ProtoPass
from laqonnx.graph.qdq import StrippedQDQ, StripQDQ
from laqonnx.graph.structure import (
    CheckModel,
    UpgradeOpset,
    eliminate_identities,
    initializers_off_inputs,
    name_nodes,
    remove_unused_nodes,
    topological_sort,
)
from tests import models

REAL = Path(__file__).parents[1] / ".." / "shared" / "real-models"


def _init(name, array, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(array, dtype), name)


def _model(nodes, inits, in_dims, out_dims, opset=17, ir_version=8, outputs=("y",), inputs_extra=()):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_dims), *inputs_extra],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, out_dims) for o in outputs],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _run(model, x, names=None):
    sess = open_session(model, optimized=False)
    return sess.run(names, {sess.get_inputs()[0].name: x})


def _same_outputs(a, b, x):
    for u, v in zip(_run(a, x), _run(b, x)):
        np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-5)


def _apply(model, p):
    """Run one pass on a copy of ``model``: (new model, changed)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    log = run_passes(copy, [p])
    return log.model, log.changed_by == (p.name,)


def _mlp(rng, hidden=6, classes=3, features=4):
    """input (N, 4) -> Gemm -> Relu -> Gemm: the weights named w0/b0/w1/b1."""
    nodes = [helper.make_node("Gemm", ["input", "w0", "b0"], ["h"], name="fc0", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w1", "b1"], ["y"], name="fc1", transB=1)]
    inits = [_init("w0", rng.normal(size=(hidden, features))), _init("b0", rng.normal(size=hidden)),
             _init("w1", rng.normal(size=(classes, hidden))), _init("b1", rng.normal(size=classes))]
    return _model(nodes, inits, ["N", features], ["N", classes])


# ---- the sequencer ------------------------------------------------------------------------------


class _Touch(ProtoPass):
    name = "touch"

    def run(self, model):
        model.doc_string = "touched"
        return True


class _Noop(ProtoPass):
    name = "noop"

    def run(self, model):
        return False


class _Boom(ir.passes.InPlacePass):
    def call(self, model):
        raise RuntimeError("library\nbug")


def test_run_passes_converts_only_between_forms_and_logs_the_passes_that_changed():
    model = _mlp(np.random.default_rng(0))
    unsorted = onnx.ModelProto()
    unsorted.CopyFrom(model)
    unsorted.graph.node.reverse()
    log = run_passes(unsorted, [_Noop(), topological_sort(), name_nodes(), _Touch(), _Noop()])
    assert log.changed_by == ("topological-sort", "touch")
    assert isinstance(log.model, onnx.ModelProto) and log.model.doc_string == "touched"
    assert [n.name for n in log.model.graph.node] == ["fc0", "relu", "fc1"]
    log = run_passes(log.model, [topological_sort(), _Noop()])
    assert log.changed_by == ()


def test_a_failing_library_pass_is_a_one_line_model_error_naming_it():
    with pytest.raises(ModelError, match=r"graph pass 'boom' failed on m.onnx: .*library bug") as info:
        run_passes(_mlp(np.random.default_rng(0)), [IRPass("boom", _Boom())], "m.onnx")
    assert "\n" not in str(info.value)


# ---- each pass ----------------------------------------------------------------------------------


def test_unsorted_graph_is_sorted_then_passes_the_checker():
    model = _mlp(np.random.default_rng(1))
    model.graph.node.reverse()
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    sorted_model, changed = _apply(model, topological_sort())
    assert changed
    onnx.checker.check_model(sorted_model)
    assert [n.name for n in sorted_model.graph.node] == ["fc0", "relu", "fc1"]
    assert _apply(sorted_model, CheckModel())[1] is False
    assert _apply(sorted_model, topological_sort())[1] is False
    x = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    _same_outputs(model, sorted_model, x)  # onnxruntime runs the unsorted graph too
    pm = load_model(model)  # the intake sorts before it checks
    assert [x.name for x in pm.layers] == ["fc0", "fc1"] and "topological-sort" in pm.changed_by


def test_checker_refuses_an_invalid_model_in_one_line():
    model = _mlp(np.random.default_rng(0))
    model.graph.node[1].input[0] = "nowhere"
    with pytest.raises(ModelError, match="m.onnx is not a valid ONNX model: .*nowhere"):
        _apply(model, CheckModel("m.onnx"))


def test_name_nodes_names_unnamed_and_duplicate_nodes_by_op_and_index():
    model = _mlp(np.random.default_rng(0))
    model.graph.node[0].name = ""
    model.graph.node[2].name = "relu"  # a duplicate of node 1
    named, changed = _apply(model, name_nodes())
    assert changed and [n.name for n in named.graph.node] == ["Gemm_0", "relu", "Gemm_2"]
    assert _apply(named, name_nodes())[1] is False


def _opset9_model(rng):
    """Opset 9: Unsqueeze with an axes attribute (an input from opset 13), BN, Conv, Flatten, Gemm."""
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["z"], name="fc", transB=1),
        helper.make_node("Unsqueeze", ["z"], ["y"], name="unsq", axes=[1]),
    ]
    inits = [_init("w", rng.normal(size=(2, 1, 3, 3))), _init("g", rng.uniform(0.5, 2, 2)), _init("b", rng.normal(size=2)),
             _init("m", rng.normal(size=2)), _init("v", rng.uniform(0.5, 2, 2)),
             _init("wf", rng.normal(size=(3, 32))), _init("bf", rng.normal(size=3))]
    return _model(nodes, inits, ["N", 1, 4, 4], ["N", 1, 3], opset=9, ir_version=4)


@pytest.mark.parametrize("opset", [9, 10])
def test_old_opset_working_copy_is_opset_13_and_computes_the_same(opset):
    model = _opset9_model(np.random.default_rng(opset))
    model.opset_import[0].version = opset
    onnx.checker.check_model(model)
    upgraded, changed = _apply(model, UpgradeOpset())
    assert changed and upgraded.opset_import[0].version == 13 and upgraded.ir_version >= 7
    unsq = next(n for n in upgraded.graph.node if n.op_type == "Unsqueeze")
    assert len(unsq.input) == 2 and not unsq.attribute  # axes became an input, as opset 13 wants
    x = np.random.default_rng(0).uniform(size=(3, 1, 4, 4)).astype(np.float32)
    _same_outputs(model, upgraded, x)
    assert _apply(upgraded, UpgradeOpset())[1] is False
    pm = load_model(model)
    assert (pm.source_opset, pm.opset) == (opset, 13)
    assert [n.op_type for n in pm.model.graph.node] == ["Conv", "Relu", "Flatten", "Gemm", "Unsqueeze"]
    _same_outputs(model, pm.model, x)


def test_opset_conversion_failure_is_one_line():
    model = _model([helper.make_node("Cast", ["input"], ["y"], to="FLOAT")], [], ["N", 4], ["N", 4], opset=5, ir_version=4)
    onnx.checker.check_model(model)
    with pytest.raises(ModelError, match="cannot convert m.onnx from opset 5 to 13: .*Cast") as info:
        _apply(model, UpgradeOpset(source="m.onnx"))
    assert "\n" not in str(info.value)


def test_initializers_listed_as_inputs_are_dropped_from_the_inputs():
    rng = np.random.default_rng(3)
    model = _mlp(rng)
    model.ir_version = 3
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)))
    onnx.checker.check_model(model)
    fixed, changed = _apply(model, initializers_off_inputs())
    assert changed and [i.name for i in fixed.graph.input] == ["input"]
    assert len(fixed.graph.initializer) == 4
    x = rng.normal(size=(2, 4)).astype(np.float32)
    _same_outputs(model, fixed, x)
    assert _apply(fixed, initializers_off_inputs())[1] is False
    pm = load_model(model)
    assert [x.name for x in pm.layers] == ["fc0", "fc1"] and "initializers-off-inputs" in pm.changed_by


def _torch_flatten(batch):
    """Conv -> torch's Shape/Gather/Unsqueeze/Concat/Reshape flatten -> Gemm, at a fixed or dynamic batch."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
        helper.make_node("Shape", ["c"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "minus1"], ["shape2"], name="concat", axis=0),
        helper.make_node("Reshape", ["c", "shape2"], ["f"], name="reshape"),
        helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1),
    ]
    inits = [_init("w", rng.normal(size=(2, 1, 3, 3))), _init("wf", rng.normal(size=(3, 8))),
             _init("zero", 0, np.int64), _init("axes", [0], np.int64), _init("minus1", [-1], np.int64)]
    return _model(nodes, inits, [batch, 1, 4, 4], [batch, 3])


def test_constant_flatten_on_a_batch_1_model_is_folded():
    model = _torch_flatten(1)
    folded, changed = _apply(model, fold_constants())
    assert changed
    ops = [n.op_type for n in folded.graph.node]
    assert not {"Shape", "Gather", "Unsqueeze", "Concat"} & set(ops) and ops.count("Reshape") == 1
    shape_input = next(n for n in folded.graph.node if n.op_type == "Reshape").input[1]
    values = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    for n in folded.graph.node:  # a Constant with value (a tensor) or value_ints
        if n.op_type == "Constant":
            a = n.attribute[0]
            values[n.output[0]] = numpy_helper.to_array(a.t) if a.name == "value" else np.array(helper.get_attribute_value(a))
    np.testing.assert_array_equal(values[shape_input], [1, -1])
    x = np.random.default_rng(0).uniform(size=(1, 1, 4, 4)).astype(np.float32)
    _same_outputs(model, folded, x)
    assert _apply(folded, fold_constants())[1] is False
    pm = load_model(model)
    assert pm.fixed_batch == 1 and "fold-constants" in pm.changed_by
    assert "Shape" not in [n.op_type for n in pm.model.graph.node]


def test_flatten_of_a_dynamic_batch_stays():
    model = _torch_flatten("N")
    folded, _ = _apply(model, fold_constants())
    assert "Shape" in [n.op_type for n in folded.graph.node]
    x = np.random.default_rng(0).uniform(size=(3, 1, 4, 4)).astype(np.float32)
    _same_outputs(model, folded, x)
    assert load_model(model).fixed_batch is None


def _constant_weights(rng):
    """Every weight and bias a Constant node (as paddle2onnx exports)."""
    model = _mlp(rng)
    for t in reversed(list(model.graph.initializer)):
        model.graph.node.insert(0, helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t))
    del model.graph.initializer[:]
    onnx.checker.check_model(model)
    return model


def test_constant_node_weights_become_initializers_and_give_the_weighted_layers():
    rng = np.random.default_rng(5)
    model = _constant_weights(rng)
    reference = _mlp(np.random.default_rng(5))
    lifted, changed = _apply(model, lift_constants())
    assert changed and [n.op_type for n in lifted.graph.node] == ["Gemm", "Relu", "Gemm"]
    assert sorted(t.name for t in lifted.graph.initializer) == ["b0", "b1", "w0", "w1"]
    x = rng.normal(size=(4, 4)).astype(np.float32)
    _same_outputs(model, lifted, x)
    assert _apply(lifted, lift_constants())[1] is False
    pm = load_model(model)
    assert [(x.name, x.weight, x.bias, x.weight_shape) for x in pm.layers] == [
        ("fc0", "w0", "b0", (6, 4)), ("fc1", "w1", "b1", (3, 6))]
    expected = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    for layer in pm.layers:
        np.testing.assert_array_equal(pm.weight(layer), expected[layer.weight])
    _same_outputs(model, pm.model, x)


def test_identity_on_weights_and_on_the_output_is_eliminated_keeping_the_output_name():
    rng = np.random.default_rng(6)
    model = _mlp(rng)
    model.graph.node[0].input[1] = "w0_copy"
    model.graph.node[2].output[0] = "y_raw"
    model.graph.node.insert(0, helper.make_node("Identity", ["w0"], ["w0_copy"], name="id_w"))
    model.graph.node.append(helper.make_node("Identity", ["y_raw"], ["y"], name="id_out"))
    out, changed = _apply(model, eliminate_identities())
    assert changed and [n.op_type for n in out.graph.node] == ["Gemm", "Relu", "Gemm"]
    assert out.graph.node[0].input[1] == "w0" and out.graph.node[2].output[0] == "y"
    assert [o.name for o in out.graph.output] == ["y"]
    x = rng.normal(size=(3, 4)).astype(np.float32)
    _same_outputs(model, out, x)
    assert _apply(out, eliminate_identities())[1] is False


def _weight_dq(rng):
    """fc0's weight stored int8 behind DequantizeLinear (per tensor, zero point 0)."""
    model = _mlp(rng)
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w0"))
    scale = np.float32(np.abs(w).max() / 127)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "w0"))
    model.graph.initializer.extend([numpy_helper.from_array(q, "w0_q"), _init("w0_s", scale), _init("w0_z", 0, np.int8)])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["w0_q", "w0_s", "w0_z"], ["w0"], name="dq"))
    return model, (q.astype(np.float32) * scale).astype(np.float32)


def test_strip_qdq_pass_reports_what_it_did():
    rng = np.random.default_rng(7)
    model, expected = _weight_dq(rng)
    record = StrippedQDQ()
    out, changed = _apply(model, StripQDQ(record))
    assert changed and [n.op_type for n in out.graph.node] == ["Gemm", "Relu", "Gemm"]
    assert set(record.qparams) == {"w0"} and record.qparams["w0"].bits == 8 and record.activation_pairs == 0
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w0")), expected)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    _same_outputs(model, out, x)
    assert _apply(out, StripQDQ())[1] is False


def test_fold_batchnorm_pass_changes_only_a_model_with_batchnorm():
    model = models.cnn(bn=True)
    folded, changed = _apply(model, FoldBatchNorm())
    assert changed and "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    x = models.random_input(model, n=3, seed=1)
    _same_outputs(model, folded, x)
    assert _apply(folded, FoldBatchNorm())[1] is False
    kept, changed = _apply(model, FoldBatchNorm(keep={"w1"}))  # a dequantized weight is not folded
    assert not changed and "BatchNormalization" in [n.op_type for n in kept.graph.node]


def _with_dead_code(rng):
    model = _mlp(rng)
    model.graph.initializer.append(_init("dangling", rng.normal(size=(5, 5))))
    model.graph.node.insert(2, helper.make_node("Sigmoid", ["h"], ["dead"], name="dead"))
    return model


def test_remove_unused_drops_dead_nodes_and_initializers_and_keeps_the_signature():
    rng = np.random.default_rng(8)
    model = _with_dead_code(rng)
    before = model.SerializeToString()
    out = remove_unused(model)
    assert model.SerializeToString() == before  # the input is not modified
    assert [n.name for n in out.graph.node] == ["fc0", "relu", "fc1"]
    assert sorted(t.name for t in out.graph.initializer) == ["b0", "b1", "w0", "w1"]
    assert [i.name for i in out.graph.input] == ["input"] and [o.name for o in out.graph.output] == ["y"]
    x = rng.normal(size=(3, 4)).astype(np.float32)
    _same_outputs(model, out, x)
    assert _apply(model, remove_unused_nodes())[1] is True
    assert _apply(out, remove_unused_nodes())[1] is False


# ---- load_model: signature fields ---------------------------------------------------------------


def test_prepared_model_signature_fields_and_output_choice():
    rng = np.random.default_rng(9)
    model = _mlp(rng)
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 6]))
    pm = load_model(model)
    assert pm.outputs == ("y", "r") and pm.output_name == "y" and pm.fixed_batch is None
    assert pm.input_dtype == np.float32 and (pm.opset, pm.source_opset) == (17, 17)
    assert [o.name for o in pm.model.graph.output] == ["y", "r"]
    assert load_model(model, output="r").output_name == "r"
    with pytest.raises(ModelError, match="'z' is not an output of the model; its outputs are: y, r"):
        load_model(model, output="z")


def test_input_dtype_and_fixed_batch_come_from_the_declared_input():
    model = _model([helper.make_node("Cast", ["input"], ["xf"], to=TensorProto.FLOAT),
                    helper.make_node("MatMul", ["xf", "w"], ["y"], name="mm")],
                   [_init("w", np.eye(4))], [2, 4], [2, 4])
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    pm = load_model(model)
    assert pm.input_dtype == np.float64 and pm.fixed_batch == 2 and pm.input_shape == (1, 4)
    assert pm.layers[0].input_shape == (1, 4)


# ---- the reader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,match", [
    ("missing", "model file not found"),
    ("folder", "is a folder"),
    ("empty", "is empty"),
    ("truncated", "not"),
    ("garbage", "not a readable ONNX model"),
])
def test_read_model_errors(tmp_path, kind, match):
    path = tmp_path / "m.onnx"
    data = models.cnn().SerializeToString()
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif kind == "garbage":
        path.write_bytes(b"\xff" * 100)
    with pytest.raises(ModelError, match=match) as info:
        read_model(path)
    assert "\n" not in str(info.value)


def _external(tmp_path):
    model = models.cnn(seed=2)
    path = tmp_path / "ext.onnx"
    onnx.save(onnx.ModelProto.FromString(model.SerializeToString()), str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    return model, path


def test_read_model_loads_external_data_and_names_a_missing_or_short_data_file(tmp_path):
    model, path = _external(tmp_path)
    read = read_model(path)
    assert read.source == str(path)
    assert {t.name: numpy_helper.to_array(t).tolist() for t in read.model.graph.initializer} == {
        t.name: numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    data = (tmp_path / "ext.data").read_bytes()
    (tmp_path / "ext.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cannot read the external data of"):
        read_model(path)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(ModelError, match=r"external data file 'ext.data' of .*ext.onnx is missing \(expected at"):
        read_model(path)


def test_read_model_refuses_a_proto_whose_external_data_was_not_loaded(tmp_path):
    _, path = _external(tmp_path)
    proto = onnx.load(str(path), load_external_data=False)
    with pytest.raises(ModelError, match=r"\('ext.data'\) that was not loaded: pass the model's path"):
        read_model(proto)
    full = onnx.load(str(path))
    read = read_model(full)
    assert read.source is None and read.model is not full


# ---- session helpers ----------------------------------------------------------------------------


def _fixed_batch_mlp(batch):
    model = _mlp(np.random.default_rng(10))
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = batch
    return model


@pytest.mark.parametrize("n", [1, 5, 8])
def test_run_batched_on_a_fixed_batch_model_equals_one_by_one(n):
    one = open_session(_fixed_batch_mlp(1))
    x = np.random.default_rng(n).normal(size=(n, 4)).astype(np.float32)
    (got,) = run_batched(one, "input", x, ["y"], 1)
    expected = np.concatenate([one.run(["y"], {"input": x[i : i + 1]})[0] for i in range(n)])
    np.testing.assert_array_equal(got, expected)
    four = open_session(_fixed_batch_mlp(4))  # padding: 5 = 4 + 1 (+3 repeats, cut off)
    (got4,) = run_batched(four, "input", x, ["y"], 4)
    assert got4.shape == (n, 3)
    np.testing.assert_allclose(got4, expected, rtol=1e-6, atol=1e-6)


def test_run_batched_dynamic_batch_in_chunks_and_several_outputs():
    model = _mlp(np.random.default_rng(11))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 6]))
    sess = open_session(model, threads=1)
    x = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    y, r = run_batched(sess, "input", x, ["y", "r"], None, batch_size=3)
    full_y, full_r = sess.run(["y", "r"], {"input": x})
    np.testing.assert_allclose(y, full_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r, full_r, rtol=1e-6, atol=1e-6)
    with pytest.raises(DataError, match="no examples"):
        run_batched(sess, "input", x[:0], ["y"], None)


def test_open_session_refuses_in_one_line():
    with pytest.raises(ModelError, match="onnxruntime cannot load the model") as info:
        open_session(b"not a model")
    assert "\n" not in str(info.value)
    broken = _mlp(np.random.default_rng(0))
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ModelError, match="NoSuchOp"):
        open_session(broken)


# ---- real classifiers exported by others ---------------------------------------------------------

# name -> weighted op types in order (MANIFEST + graph), fixed batch, opset as exported, passes that must run
REAL_MODELS = {
    "andrey_mnist.onnx": (["Conv"] * 2 + ["Gemm"] * 3, None, 10, {"upgrade-opset"}),
    "sightvanish_mnist.onnx": (["Conv"] * 2 + ["Gemm"] * 2, 1, 9, {"upgrade-opset", "lift-constants"}),
    "onjackay_mnist.onnx": (["Conv"] * 2 + ["Gemm"], 1, 17, {"lift-constants"}),
    "zuramai_mnist.onnx": (["Conv", "Gemm"], None, 20, set()),
    "wuhan_mnist-lg.onnx": (["Conv"] * 2 + ["MatMul"] * 2, None, 10, {"topological-sort", "upgrade-opset"}),
    "onnc_resnet20.onnx": (["Conv"] * 21 + ["Gemm"], 1, 9, {"upgrade-opset", "fold-constants", "fold-batchnorm"}),
}


def _real(name: str) -> Path:
    if not REAL.is_dir():
        pytest.skip(f"the real models folder {REAL.resolve()} is absent")
    path = REAL / name
    if not path.exists():
        pytest.skip(f"{path.resolve()} is absent")
    return path


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_model_intake(name):
    path = _real(name)
    ops, batch, opset, passes = REAL_MODELS[name]
    original = onnx.load(str(path))
    assert sorted(n.op_type for n in original.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")) == sorted(ops)
    pm = load_model(path)
    assert [x.op_type for x in pm.layers] == ops and not pm.skipped
    assert all(x.input_shape is not None and x.input_shape[0] == 1 for x in pm.layers)
    assert pm.fixed_batch == batch and pm.source_opset == opset and pm.opset == max(opset, 13)
    assert passes <= set(pm.changed_by), pm.changed_by
    assert "BatchNormalization" not in [n.op_type for n in pm.model.graph.node]
    onnx.checker.check_model(pm.model)
    orig_sess, work_sess = open_session(path), open_session(pm.model)
    sig = lambda s: ([(i.name, i.shape) for i in s.get_inputs()], [o.name for o in s.get_outputs()])  # noqa: E731
    assert sig(work_sess) == sig(orig_sess)
    assert pm.outputs == tuple(o.name for o in original.graph.output)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.uniform(-1, 1, (batch or 3, *pm.input_shape[1:])).astype(pm.input_dtype)
        for u, v in zip(orig_sess.run(None, {pm.input_name: x}), work_sess.run(None, {pm.input_name: x})):
            np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-5)


def test_keras2onnx_graph_is_refused_by_the_checker_as_written():
    original = onnx.load(str(_real("wuhan_mnist-lg.onnx")))
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(original)


def test_resnet20_flatten_is_folded_and_batchnorm_gone():
    pm = load_model(_real("onnc_resnet20.onnx"))
    ops = [n.op_type for n in pm.model.graph.node]
    assert not {"Shape", "Gather", "Unsqueeze", "Concat", "BatchNormalization", "Constant"} & set(ops)
    assert ops.count("Conv") == 21 and ops.count("Add") == 9


def test_onjackay_outputs_and_output_choice():
    path = _real("onjackay_mnist.onnx")
    pm = load_model(path)
    assert pm.outputs == ("output", "hidden") and pm.output_name == "output"
    assert load_model(path, output="hidden").output_name == "hidden"
    with pytest.raises(ModelError, match="'logits' is not an output of .*onjackay_mnist.onnx; its outputs are: output, hidden"):
        load_model(path, output="logits")


def test_zuramai_needs_its_external_data_file(tmp_path):
    src = _real("zuramai_mnist.onnx")
    shutil.copy(src, tmp_path / src.name)
    with pytest.raises(ModelError, match="external data file 'mnist.onnx.data' of .* is missing"):
        load_model(tmp_path / src.name)
    shutil.copy(src.parent / "mnist.onnx.data", tmp_path / "mnist.onnx.data")
    assert len(load_model(tmp_path / src.name).layers) == 2


def test_run_batched_on_a_real_batch_1_model_equals_one_by_one():
    pm = load_model(_real("sightvanish_mnist.onnx"))
    sess = open_session(pm.model)
    x = np.random.default_rng(1).uniform(0, 1, (5, *pm.input_shape[1:])).astype(np.float32)
    (got,) = run_batched(sess, pm.input_name, x, [pm.output_name], pm.fixed_batch)
    expected = np.concatenate([sess.run([pm.output_name], {pm.input_name: x[i : i + 1]})[0] for i in range(5)])
    assert got.shape == (5, 10)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_model_analyze_gives_finite_lipschitz_constants(name):
    from laqonnx.lipschitz.analyze import analyze

    path = _real(name)
    result = analyze(path, progress=False)
    assert [x.op_type for x in result.layers] == REAL_MODELS[name][0]
    assert all(math.isfinite(x.lipschitz) and x.lipschitz > 0 for x in result.layers)
