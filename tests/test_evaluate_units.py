"""``laqonnx evaluate`` on models shaped like other people's: tiny onnx.helper models with inputs in
[-1, 1], NHWC, a batch fixed to 1, two outputs, int64 token ids through Gather, and a broken model
among good ones. Every accuracy is checked against an answer computed independently (numpy, or
onnxruntime run here one example at a time)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import laqonnx
from laqonnx.cli import main
from laqonnx.data import open_data
from laqonnx.errors import DataError, LaqonnxWarning, ModelError
from laqonnx.robustness.evaluate import format_table, integer_input_reason

pytest.importorskip("art")

RNG_RANGE = (-1.0, 1.0)


def _model(nodes, inputs, outputs, inits, name="m") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _float_input(name, dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _linear(w: np.ndarray, b: np.ndarray, dims, pre=(), name="lin") -> onnx.ModelProto:
    """x (dims) -> [pre nodes] -> Flatten -> Gemm(w, b) -> logits."""
    nodes = [*pre, helper.make_node("Flatten", [pre[-1].output[0] if pre else "x"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "W", "B"], ["logits"])]
    return _model(nodes, [_float_input("x", dims)], [_float_input("logits", [dims[0], w.shape[1]])],
                  {"W": w.astype(np.float32), "B": b.astype(np.float32)}, name)


def _ort_labels(model: onnx.ModelProto, x: np.ndarray, output: str | None = None) -> np.ndarray:
    """Independent answer: onnxruntime, one example at a time."""
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.array([s.run([output] if output else None, {name: x[i:i + 1]})[0].reshape(-1).argmax()
                     for i in range(len(x))])


def _digits_linear(channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A least-squares linear classifier of the 8x8 digits (train split), weights for (C, H, W) order."""
    x, y = next(open_data("digits:train", input_shape=(1, 1, 8, 8)).batches(10_000))
    a = np.c_[x.reshape(len(x), -1), np.ones(len(x))]
    sol = np.linalg.lstsq(a, np.eye(10)[y], rcond=None)[0]
    return sol[:-1], sol[-1]


@pytest.fixture(scope="module")
def digits_test() -> tuple[np.ndarray, np.ndarray]:
    x, y = next(open_data("digits:test", input_shape=(1, 1, 8, 8), limit=40).batches(40))
    return x, y


# ---- input range [-1, 1]


def _robust_linear_two_class(w, b, x, y, eps, lo, hi) -> float:
    """Exact robust accuracy of a 2-class linear model under L-inf eps with inputs kept in [lo, hi]."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    robust = []
    for xi, t in zip(flat, y):
        c = w[:, t] - w[:, 1 - t]
        low, high = np.maximum(lo, xi - eps), np.minimum(hi, xi + eps)
        worst = np.where(c > 0, c * low, c * high).sum() + b[t] - b[1 - t]
        clean = c @ xi + b[t] - b[1 - t]
        robust.append(clean > 0 and worst > 0)
    return float(np.mean(robust))


@pytest.fixture(scope="module")
def signed_case():
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(16, 2)), rng.normal(size=2) * 0.1
    # values at and near the ends of [-1, 1], where clipping to the range (not to [0, 1]) decides
    x = rng.choice([-1.0, -0.9, -0.2, 0.3, 0.9, 1.0], size=(300, 1, 4, 4)).astype(np.float32)
    flat = x.reshape(len(x), -1)
    y = (flat @ w + b).argmax(1)
    y[:30] = 1 - y[:30]  # some wrong labels: clean accuracy 0.9
    return _linear(w, b, ["N", 1, 4, 4]), w, b, x, y.astype(np.int64)


def test_input_range_sets_clipping_and_eps_units(signed_case) -> None:
    model, w, b, x, y = signed_case
    eps = 0.3
    report = laqonnx.evaluate(model, (x, y), eps, attacks=["fgsm", "pgd"], input_range=RNG_RANGE, latency=False,
                              progress=False)
    m = report.models[0]
    assert m.clean_accuracy == pytest.approx(float(np.mean((x.reshape(300, -1) @ w + b).argmax(1) == y))) == 0.9
    exact = _robust_linear_two_class(w, b, x, y, eps, *RNG_RANGE)
    # the answer depends on the range: clipping to [0, 1], or not at all, would give other numbers
    assert exact != _robust_linear_two_class(w, b, x, y, eps, -np.inf, np.inf)
    assert exact != _robust_linear_two_class(w, b, np.clip(x, 0, 1), y, eps, 0.0, 1.0)
    assert m.robust_accuracy["fgsm"] == pytest.approx(exact)  # FGSM reaches the linear model's worst corner
    assert m.robust_accuracy["pgd"] == pytest.approx(exact)
    assert m.robust_accuracy["worst_case"] == pytest.approx(exact) and exact < m.clean_accuracy
    assert m.mirror_agreement == 1.0
    data = json.loads(json.dumps(report.to_json()))
    assert data["input_range"] == [-1.0, 1.0] and data["eps"] == pytest.approx(eps)
    assert "[-1, 1]" in format_table(report)


def test_data_outside_the_input_range_is_a_data_error_naming_it(signed_case) -> None:
    model, _, _, x, y = signed_case
    with pytest.raises(DataError, match=r"expected \[0, 1\].*--input-range"):
        laqonnx.evaluate(model, (x, y), 0.1, attacks=["fgsm"], latency=False, progress=False)
    with pytest.raises(DataError, match=r"expected \[-0\.5, 0\.5\]"):
        laqonnx.evaluate(model, (x, y), 0.1, attacks=["fgsm"], input_range=(-0.5, 0.5), latency=False, progress=False)


def test_eps_of_half_the_range_warns(signed_case) -> None:
    model, _, _, x, y = signed_case
    with pytest.warns(LaqonnxWarning, match=r"half the width of the input range \[-1, 1\].*eps/255"):
        laqonnx.evaluate(model, (x[:8], y[:8]), 1.0, attacks=["fgsm"], input_range=RNG_RANGE, latency=False,
                         progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LaqonnxWarning)
        laqonnx.evaluate(model, (x[:8], y[:8]), 0.99, attacks=["fgsm"], input_range=RNG_RANGE, latency=False,
                         progress=False)  # below half of the width 2: no warning
        laqonnx.evaluate(model, (x[:8], y[:8]), 1.5, norm="2", attacks=["fgsm"], input_range=RNG_RANGE,
                         latency=False, progress=False)  # L2 radii grow with the input size: no warning


def test_pixel_data_are_mapped_onto_the_range(digits_test) -> None:
    w, b = _digits_linear()
    model = _linear(w / 2, b + w.sum(0) / 2, ["N", 1, 8, 8])  # the same classifier on inputs 2x - 1
    m = laqonnx.evaluate(model, "digits", 0.05, attacks=["pgd"], input_range=RNG_RANGE, limit=40, latency=False,
                         progress=False).models[0]
    x, y = digits_test
    assert m.clean_accuracy == float(np.mean(_ort_labels(model, 2 * x - 1) == y)) >= 0.85


# ---- layouts, fixed batch, outputs


def test_nhwc_model_gets_nhwc_data_and_channels_last_attacks(digits_test) -> None:
    w, b = _digits_linear()
    pre = [helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2])]
    model = _linear(w, b, ["N", 8, 8, 1], pre=pre)
    report = laqonnx.evaluate(model, "digits", 0.1, attacks=["pgd", "square"], limit=40, latency=False,
                              progress=False)
    m = report.models[0]
    x, y = digits_test
    assert m.input_shape == (8, 8, 1)
    assert m.clean_accuracy == float(np.mean(_ort_labels(model, x.transpose(0, 2, 3, 1)) == y)) >= 0.85
    assert set(m.robust_accuracy) == {"pgd", "square", "worst_case"} and not m.skipped  # square ran, channels last
    assert m.robust_accuracy["worst_case"] <= min(m.robust_accuracy["pgd"], m.robust_accuracy["square"]) < m.clean_accuracy
    assert m.mirror_agreement == 1.0


def test_batch_fixed_to_one_runs_chunk_by_chunk(digits_test) -> None:
    w, b = _digits_linear()
    shape = numpy_helper.from_array(np.array([1, 64], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]),  # [1, 64]: onnxruntime refuses other batches
             helper.make_node("Gemm", ["flat", "W", "B"], ["logits"])]
    graph = helper.make_graph(nodes, "b1", [_float_input("x", [1, 1, 8, 8])], [_float_input("logits", [1, 10])],
                              [numpy_helper.from_array(w.astype(np.float32), "W"),
                               numpy_helper.from_array(b.astype(np.float32), "B"), shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x, y = digits_test
    m = laqonnx.evaluate(model, "digits", 0.1, attacks=["pgd", "square"], limit=40, batch_size=16,
                         progress=False).models[0]
    assert m.clean_accuracy == float(np.mean(_ort_labels(model, x) == y)) >= 0.85
    assert m.mirror_agreement == 1.0 and m.white_box_reliable
    assert not m.skipped and m.robust_accuracy["worst_case"] <= m.clean_accuracy
    assert m.latency_ms["batch_size"] == 1 and m.latency_ms["p50"] > 0


def _two_outputs() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    w, b = _digits_linear()
    nodes = [helper.make_node("Flatten", ["x"], ["hidden"], axis=1),
             helper.make_node("Gemm", ["hidden", "W", "B"], ["logits"])]
    model = _model(nodes, [_float_input("x", ["N", 1, 8, 8])],
                   [_float_input("hidden", ["N", 64]), _float_input("logits", ["N", 10])],
                   {"W": w.astype(np.float32), "B": b.astype(np.float32)})
    return model, w, b


def test_multi_output_model_classifies_on_the_chosen_output(digits_test) -> None:
    model, _, _ = _two_outputs()
    x, y = digits_test
    chosen = laqonnx.evaluate(model, "digits", 0.05, attacks=["pgd"], limit=40, output="logits", latency=False,
                              progress=False).models[0]
    first = laqonnx.evaluate(model, "digits", 0.05, attacks=["pgd"], limit=40, latency=False, progress=False).models[0]
    assert chosen.output_name == "logits" and first.output_name == "hidden"
    assert chosen.clean_accuracy == float(np.mean(_ort_labels(model, x, "logits") == y)) >= 0.85
    assert first.clean_accuracy == float(np.mean(x.reshape(len(x), -1).argmax(1) == y))  # argmax of the pixels
    assert chosen.to_json()["output"] == "logits"
    with pytest.raises(ModelError, match="its outputs are: hidden, logits"):
        laqonnx.evaluate(model, "digits", 0.05, attacks=["pgd"], limit=4, output="nope", latency=False, progress=False)


def test_cli_output_and_input_range_options(tmp_path, capsys) -> None:
    model, _, _ = _two_outputs()
    onnx.save(model, tmp_path / "two.onnx")
    args = ["evaluate", str(tmp_path / "two.onnx"), "--data", "digits", "--eps", "0.05", "--attacks", "fgsm",
            "--limit", "10", "--no-latency"]
    assert main([*args, "--output", "nope", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "its outputs are: hidden, logits" in err
    out = tmp_path / "e.json"
    assert main([*args, "--output", "logits", "--input-range=-1,1", "--quiet", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["input_range"] == [-1.0, 1.0] and data["models"][0]["output"] == "logits"
    with pytest.raises(SystemExit):
        main([*args, "--input-range", "1,0"])
    assert "LO < HI" in capsys.readouterr().err


# ---- integer input


def test_integer_input_model_reports_clean_accuracy_and_skips_lp_attacks() -> None:
    rng = np.random.default_rng(0)
    vocab, length, dim = 20, 5, 3
    table, w, b = rng.normal(size=(vocab, dim)), rng.normal(size=(length * dim, 3)), rng.normal(size=3)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], axis=0),
             helper.make_node("Flatten", ["emb"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "W", "B"], ["logits"])]
    model = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", length])],
                   [_float_input("logits", ["N", 3])],
                   {"E": table.astype(np.float32), "W": w.astype(np.float32), "B": b.astype(np.float32)})
    ids = rng.integers(0, vocab, size=(50, length)).astype(np.int64)
    y = rng.integers(0, 3, size=50).astype(np.int64)
    report = laqonnx.evaluate(model, (ids, y), 0.1, progress=False)
    m = report.models[0]
    expected = (table[ids].reshape(50, -1) @ w + b).argmax(1)
    assert m.clean_accuracy == float(np.mean(expected == y))
    assert m.input_dtype == "int64" and m.mirror_agreement_clean == 1.0
    reason = "Lp attacks need a continuous input; this model's input is int64"
    assert integer_input_reason(np.int64) == reason
    assert set(m.skipped) == set(report.attacks) and set(m.skipped.values()) == {reason}
    assert m.robust_accuracy == {"worst_case": None} and m.latency_ms["p50"] > 0
    entry = json.loads(json.dumps(report.to_json()))["models"][0]
    assert entry["robust_accuracy"]["worst_case"] is None and entry["skipped_attacks"]["pgd"] == reason
    assert "not measured" in format_table(report)
    with pytest.raises(DataError, match="integers"):
        laqonnx.evaluate(model, (ids.astype(np.float32), y), 0.1, latency=False, progress=False)


# ---- a broken model among good ones


def test_a_model_that_fails_is_reported_and_the_others_evaluated(tmp_path, capsys, digits_test) -> None:
    w, b = _digits_linear()
    good = _linear(w, b, ["N", 1, 8, 8])
    onnx.save(good, tmp_path / "good.onnx")
    odd = onnx.ModelProto()
    odd.CopyFrom(good)
    odd.graph.node.insert(0, helper.make_node("NoSuchOp", ["x"], ["x2"]))
    odd.graph.node[1].input[0] = "x2"
    onnx.save(odd, tmp_path / "unsupported.onnx")
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 10)
    paths = [str(tmp_path / n) for n in ("good.onnx", "unsupported.onnx", "corrupt.onnx")]
    with pytest.warns(LaqonnxWarning, match="was not evaluated"):
        report = laqonnx.evaluate(paths, "digits", 0.1, attacks=["fgsm"], limit=40, latency=False, progress=False)
    x, y = digits_test
    assert [m.path for m in report.models] == paths[:1]
    assert report.models[0].clean_accuracy == float(np.mean(_ort_labels(good, x) == y))
    assert [f.path for f in report.failed] == paths[1:]
    assert "onnxruntime cannot load" in report.failed[0].error and "NoSuchOp" in report.failed[0].error
    assert "not a readable ONNX model" in report.failed[1].error
    table = format_table(report)
    assert "unsupported.onnx  failed: onnxruntime cannot load" in table and "corrupt.onnx" in table
    entries = report.to_json()["models"]
    assert [("error" in e) for e in entries] == [False, True, True]

    out = tmp_path / "e.json"
    assert main(["evaluate", *paths, "--data", "digits", "--eps", "0.1", "--attacks", "fgsm", "--limit", "20",
                 "--no-latency", "--no-progress", "--json", str(out), "--report", str(tmp_path / "rep")]) == 0
    captured = capsys.readouterr()
    assert "failed: " in captured.out and len(json.loads(out.read_text())["models"]) == 3
    assert "failed: onnxruntime cannot load" in (tmp_path / "rep" / "report.md").read_text()
    assert main(["evaluate", *paths[1:], "--data", "digits", "--eps", "0.1", "--attacks", "fgsm",
                 "--no-latency"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("laqonnx evaluate: error: no model could be evaluated")
    assert "unsupported.onnx" in err and "corrupt.onnx" in err


def test_softmax_behind_identity_is_stripped(signed_case) -> None:
    """keras2onnx ends in Softmax -> Identity: attacks must still see the logits."""
    model, _, _, x, y = signed_case
    soft = onnx.ModelProto()
    soft.CopyFrom(model)
    soft.graph.node[-1].output[0] = "z"
    soft.graph.node.extend([helper.make_node("Softmax", ["z"], ["p"], axis=1),
                            helper.make_node("Identity", ["p"], ["logits"])])
    kw = dict(attacks=["pgd"], input_range=RNG_RANGE, latency=False, progress=False)
    a = laqonnx.evaluate(model, (x[:60], y[:60]), 0.3, **kw).models[0]
    b = laqonnx.evaluate(soft, (x[:60], y[:60]), 0.3, **kw).models[0]
    assert b.softmax_stripped and not a.softmax_stripped and b.output_name == "logits"
    assert b.robust_accuracy == a.robust_accuracy and b.clean_accuracy == a.clean_accuracy
