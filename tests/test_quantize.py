"""End to end: `laqonnx.quantize` / `laqonnx quantize` on a digits CNN and tiny models."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import laqonnx
from laqonnx.cli import main
from laqonnx.errors import LaqonnxError, OptionError, PlanError
from laqonnx.quant.plan import Plan
from laqonnx.zoo.digits import load_digits
from tests import models

CALIB_LIMIT = 400


@pytest.fixture(scope="module")
def digits_cnn(tmp_path_factory) -> str:
    """The small CNN trained on digits (8x8, 1 channel) shared by the tests, saved as ONNX."""
    pytest.importorskip("torch")
    from tests._digits_model import digits_cnn as trained

    path = tmp_path_factory.mktemp("digits") / "cnn.onnx"
    onnx.save(trained()[1], str(path))
    return str(path)


def _run(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _weight_dq(model: onnx.ModelProto) -> dict[str, tuple[onnx.TensorProto, np.ndarray, np.ndarray]]:
    """layer node name -> (quantized weight initializer, scale, zero point), read from the graph."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            dq = producer.get(node.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                out[node.name] = (
                    inits[dq.input[0]],
                    numpy_helper.to_array(inits[dq.input[1]]),
                    numpy_helper.to_array(inits[dq.input[2]]),
                )
    return out


def _bits(t: onnx.TensorProto) -> int:
    return {onnx.TensorProto.INT8: 8, onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT8: 8}[t.data_type]


def test_int8_digits_cnn_agrees_with_float(digits_cnn, tmp_path):
    out = tmp_path / "cnn.int8.onnx"
    res = laqonnx.quantize(digits_cnn, out, "digits", progress=False)
    assert isinstance(res, laqonnx.QuantizeResult)
    x, y = load_digits(8, "test")
    ref, q = _run(digits_cnn, x).argmax(1), _run(out, x).argmax(1)
    assert (ref == q).mean() >= 0.98
    assert res.avg_weight_bits == 8.0
    dq = _weight_dq(onnx.load(str(out)))
    assert set(dq) == {lp.name for lp in res.plan.layers}
    # the written scales are the plan's
    for lp in res.plan.layers:
        init, scale, zp = dq[lp.name]
        np.testing.assert_array_equal(np.ravel(scale), np.asarray(lp.weight_scale, dtype=np.float32))
        np.testing.assert_array_equal(np.ravel(zp).astype(np.int64), np.asarray(lp.weight_zero_point))
        assert _bits(init) == 8
    # and the plan on disk round-trips
    assert Plan.load(res.plan_path) == res.plan


def test_avg_weight_bits_budget(digits_cnn, tmp_path):
    out = tmp_path / "cnn.w5.onnx"
    res = laqonnx.quantize(digits_cnn, out, "digits", avg_weight_bits=5, calib_limit=CALIB_LIMIT, progress=False)
    dq = _weight_dq(onnx.load(str(out)))
    params = {name: int(np.prod(t.dims)) for name, (t, _, _) in dq.items()}
    avg = sum(params[n] * _bits(t) for n, (t, _, _) in dq.items()) / sum(params.values())
    assert avg <= 5.0
    assert avg == pytest.approx(res.avg_weight_bits)
    assert any("int4" in w for w in res.warnings)
    x, _ = load_digits(8, "test")
    assert _run(out, x[:16]).shape == (16, 10)


def test_edited_plan_changes_exactly_that_layer(digits_cnn, tmp_path):
    first = laqonnx.quantize(digits_cnn, tmp_path / "a.onnx", "digits", calib_limit=CALIB_LIMIT, progress=False)
    d = first.plan.to_json()
    target = d["layers"][1]
    new_weight = {"bits": 8, "granularity": "per_tensor", "method": "maxabs", "percentile": 99.99}
    if target["chosen"]["weight"] == new_weight:
        new_weight = {"bits": 4, "granularity": "per_tensor", "method": "maxabs", "percentile": 99.99}
    target["chosen"]["weight"] = new_weight
    edited = tmp_path / "edited.plan.json"
    edited.write_text(json.dumps(d))
    second = laqonnx.quantize(digits_cnn, tmp_path / "b.onnx", plan=edited, progress=False)  # no calib: stored ranges
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    qa, qb = _weight_dq(a), _weight_dq(b)
    for name in qa:
        same = np.array_equal(numpy_helper.to_array(qa[name][0]), numpy_helper.to_array(qb[name][0])) and np.array_equal(
            qa[name][1], qb[name][1]
        )
        assert same == (name != target["name"]), name
    assert np.ravel(qb[target["name"]][1]).size == 1  # per-tensor now
    # activation scales untouched
    ia = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer if i.name.endswith("_scale") and "quantized" not in i.name}
    ib = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer if i.name in ia}
    act = [n for n in ia if not any(n.startswith(t[0].name.replace("_quantized", "")) for t in qa.values())]
    assert act and all(np.array_equal(ia[n], ib[n]) for n in act)
    assert second.plan.layer(target["name"]).chosen.weight.granularity.__class__.__name__ == "PerTensor"


def test_edited_activation_needs_calib(digits_cnn, tmp_path):
    first = laqonnx.quantize(digits_cnn, tmp_path / "a.onnx", "digits", calib_limit=CALIB_LIMIT, progress=False)
    d = first.plan.to_json()
    act = d["layers"][0]["chosen"]["activation"]
    act["method"] = "mse" if act["method"] != "mse" else "minmax"
    edited = tmp_path / "edited.plan.json"
    edited.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="re-apply the plan with --calib"):
        laqonnx.quantize(digits_cnn, tmp_path / "b.onnx", plan=edited, progress=False)
    res = laqonnx.quantize(digits_cnn, tmp_path / "c.onnx", "digits", plan=edited, calib_limit=CALIB_LIMIT, progress=False)
    first_range = first.plan.range_map()["input"]
    new_range = res.plan.range_map()["input"]
    assert new_range.activation.method == act["method"] != first_range.activation.method


def test_plan_for_another_model_is_rejected(tmp_path):
    m1, m2 = tmp_path / "m1.onnx", tmp_path / "m2.onnx"
    onnx.save(models.cnn(seed=0), str(m1))
    onnx.save(models.cnn(seed=1), str(m2))
    x = models.random_input((1, 8, 8), n=24)
    np.savez(tmp_path / "calib.npz", x=x)
    res = laqonnx.quantize(m1, tmp_path / "q1.onnx", str(tmp_path / "calib.npz"), progress=False)
    with pytest.raises(PlanError, match="another model"):
        laqonnx.quantize(m2, tmp_path / "q2.onnx", plan=res.plan_path, progress=False)


def test_residual_model_with_baseline(tmp_path):
    path = tmp_path / "res.onnx"
    onnx.save(models.residual(), str(path))
    x = models.random_input((1, 6, 6), n=32)
    np.savez(tmp_path / "calib.npz", x=x)
    res = laqonnx.quantize(path, tmp_path / "res.q.onnx", str(tmp_path / "calib.npz"), baseline="ort-minmax", per_channel=True, progress=False)
    assert res.baseline_output is not None and res.baseline_output.exists()
    assert all(lp.chosen.weight.granularity.__class__.__name__ == "PerChannel" for lp in res.plan.layers)
    ref = _run(path, x)
    for p in (res.output, res.baseline_output):
        assert np.abs(_run(p, x) - ref).max() < 0.1 * np.abs(ref).max()


# ------------------------------------------------------------------------------ bad input via the CLI


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(models.cnn(), str(path))
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous output")
    return path, out, path.read_bytes()


def _bad_npz(tmp_path, kind: str) -> str:
    p = tmp_path / f"{kind}.npz"
    if kind == "shape":
        np.savez(p, x=np.random.default_rng(0).uniform(0, 1, (4, 3, 8, 8)).astype(np.float32))
    elif kind == "nan":
        x = np.random.default_rng(0).uniform(0, 1, (4, 1, 8, 8)).astype(np.float32)
        x[0, 0, 0, 0] = np.nan
        np.savez(p, x=x)
    elif kind == "pickle":
        p = tmp_path / "data_batch_1"

        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))

        p.write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}))
    return str(p)


@pytest.mark.parametrize("kind,match", [("shape", "shape"), ("nan", "NaN"), ("pickle", "")])
def test_bad_data_is_one_line_exit_2_and_nothing_overwritten(tiny, tmp_path, capsys, kind, match):
    model, out, before = tiny
    rc = main(["quantize", str(model), "-o", str(out), "--calib", _bad_npz(tmp_path, kind), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("laqonnx quantize: error:") and "\n" not in err and match in err
    assert "pwned" not in capsys.readouterr().out
    assert model.read_bytes() == before
    assert out.read_bytes() == b"previous output"
    assert not (tmp_path / "out.plan.json").exists()


@pytest.mark.parametrize("where", ["missing-folder", "a-folder", "the-input", "under-a-file", "proc"])
def test_unwritable_output(tiny, tmp_path, capsys, monkeypatch, where):
    """Refused up front, before the model is even loaded: one line, exit 2, nothing written."""
    model, _, before = tiny
    if where == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    (tmp_path / "file.txt").write_text("x")
    out = {"missing-folder": tmp_path / "nope" / "q.onnx", "a-folder": tmp_path, "the-input": model,
           "under-a-file": tmp_path / "file.txt" / "q.onnx", "proc": "/proc/q.onnx"}[where]

    def no_work(*a, **k):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr("laqonnx.quant.workflow.load_model", no_work)
    rc = main(["quantize", str(model), "-o", str(out), "--calib", "digits", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("laqonnx quantize: error:") and "\n" not in err
    assert ("overwrite the input" if where == "the-input" else "cannot write") in err
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "m.onnx", "out.onnx"]


def test_two_budgets_are_one_line_exit_2(tiny, tmp_path, capsys):
    model, out, _ = tiny
    rc = main(["quantize", str(model), "-o", str(out), "--calib", "digits", "--max-bytes", "50000",
               "--avg-weight-bits", "6", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "at most one budget" in err and "internal error" not in err
    assert out.read_bytes() == b"previous output" and not (tmp_path / "out.plan.json").exists()


def test_infeasible_budget_names_minimum(tiny, capsys):
    model, out, _ = tiny
    rc = main(["quantize", str(model), "-o", str(out), "--calib", "digits", "--calib-limit", "50", "--avg-weight-bits", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "minimum achievable" in err and "4 bits" in err
    assert out.read_bytes() == b"previous output"


def test_cli_writes_model_plan_and_json(tiny, tmp_path, capsys):
    model, out, _ = tiny
    np.savez(tmp_path / "calib.npz", x=models.random_input((1, 8, 8), n=16))
    rc = main([
        "quantize", str(model), "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "--eps", "4/255",
        "--objective", "mse", "--json", str(tmp_path / "r.json"), "--no-progress",
    ])
    text = capsys.readouterr().out
    assert rc == 0
    assert "conv1" in text and "wrote" in text and "int8" in text
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["avg_weight_bits"] == 8.0 and summary["output"] == str(out)
    plan = Plan.load(tmp_path / "out.plan.json")
    assert plan.objective == "mse" and plan.eps == pytest.approx(4 / 255)
    assert _run(out, models.random_input((1, 8, 8), n=2)).shape == (2, 10)


def test_cli_method_lists_narrow_the_scored_candidates(tiny, tmp_path, capsys):
    """--weight-methods / --activation-methods: only those candidates are scored (so chosen), in
    both granularities; unknown names and --plan together with them are refused, nothing written."""
    from laqonnx.quant.metric import CandidateSpace

    model, out, _ = tiny
    np.savez(tmp_path / "calib.npz", x=models.random_input((1, 8, 8), n=16))
    calib = str(tmp_path / "calib.npz")
    rc = main(["quantize", str(model), "-o", str(out), "--calib", calib, "--weight-methods", "mse, maxabs,mse",
               "--activation-methods", "entropy", "--no-progress"])
    assert rc == 0
    plan = Plan.load(tmp_path / "out.plan.json")
    ranges = plan.range_map()
    for lp in plan.layers:
        weights = {(s.setting.method, type(s.setting.granularity).__name__) for s in lp.scores}
        assert weights == {("mse", "PerTensor"), ("maxabs", "PerTensor"), ("mse", "PerChannel"), ("maxabs", "PerChannel")}
        assert {s.setting.method for s in ranges[lp.activation_source].scores} == {"entropy"}
        assert lp.chosen.activation.method == "entropy" and lp.chosen.weight.method in ("mse", "maxabs")
    capsys.readouterr()

    out.write_bytes(b"previous output")
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(model), "-o", str(out), "--calib", calib, "--weight-methods", "maxabs,minmax"])
    assert exc.value.code == 2
    assert "expected a comma-separated subset of maxabs,mse,percentile" in capsys.readouterr().err
    rc = main(["quantize", str(model), "-o", str(out), "--plan", str(tmp_path / "out.plan.json"), "--weight-methods", "maxabs",
               "--no-progress"])
    assert rc == 2 and "do not apply when re-applying a plan" in capsys.readouterr().err
    assert out.read_bytes() == b"previous output"
    with pytest.raises(PlanError, match="do not apply when re-applying a plan"):  # the API says the same
        laqonnx.quantize(model, out, plan=tmp_path / "out.plan.json", candidates=CandidateSpace(weight_methods=("maxabs",)),
                         progress=False)
    assert out.read_bytes() == b"previous output"


def test_adversarial_calibration_merges_histograms(tmp_path):
    from laqonnx.quant.metric import CandidateSpace

    path = tmp_path / "m.onnx"
    onnx.save(models.cnn(), str(path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "clean.npz", x=rng.uniform(0, 0.5, (16, 1, 8, 8)).astype(np.float32))
    adv = rng.uniform(0.5, 0.9, (8, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "adv.npz", x=adv)
    space = CandidateSpace(activation_methods=("minmax",))
    clean = laqonnx.quantize(path, tmp_path / "c.onnx", str(tmp_path / "clean.npz"), candidates=space,
                             adversarial_calib=False, progress=False)
    merged = laqonnx.quantize(
        path, tmp_path / "a.onnx", str(tmp_path / "clean.npz"), adversarial_calib=str(tmp_path / "adv.npz"),
        candidates=space, progress=False,
    )
    assert clean.plan.range_map()["input"].rmax <= 0.5
    assert merged.plan.range_map()["input"].rmax == pytest.approx(float(adv.max()))
    assert merged.plan.adversarial_calib.startswith("from data") and "adversarial" in merged.plan.activation_stats
    assert clean.plan.adversarial_calib == "off" and clean.plan.activation_stats == "clean"


def test_generated_adversarial_calibration(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "m.onnx"
    onnx.save(models.cnn(), str(path))
    np.savez(tmp_path / "clean.npz", x=np.full((8, 1, 8, 8), 0.5, dtype=np.float32))
    space = laqonnx.quant.metric.CandidateSpace(activation_methods=("minmax",))
    res = laqonnx.quantize(path, tmp_path / "a.onnx", str(tmp_path / "clean.npz"), adversarial_calib=True, eps=0.1, candidates=space, progress=False)
    r = res.plan.range_map()["input"]
    # PGD moved the constant 0.5 images within the eps ball: the range now spans [0.4, 0.6] (up to rounding)
    assert r.rmin == pytest.approx(0.4, abs=1e-6) and r.rmax == pytest.approx(0.6, abs=1e-6)


def test_max_bytes_budget(tmp_path):
    path = tmp_path / "m.onnx"
    model = models.cnn()
    onnx.save(model, str(path))
    np.savez(tmp_path / "calib.npz", x=models.random_input((1, 8, 8), n=16))
    layer_w = {"w1", "w2", "w3"}
    other = sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer if i.name not in layer_w)
    int8_weights = sum(numpy_helper.to_array(i).size for i in model.graph.initializer if i.name in layer_w)
    budget = other + int(0.75 * int8_weights)  # below all-int8: some layers must go int4
    res = laqonnx.quantize(path, tmp_path / "q.onnx", str(tmp_path / "calib.npz"), max_bytes=budget, progress=False)
    q = onnx.load(str(tmp_path / "q.onnx"))
    used = other
    for _, (t, scale, zp) in _weight_dq(q).items():
        n = int(np.prod(t.dims))
        used += (n * _bits(t) + 7) // 8 + 5 * np.ravel(scale).size
    assert used <= budget
    assert res.avg_weight_bits < 8
    with pytest.raises(PlanError, match="infeasible"):
        laqonnx.quantize(path, tmp_path / "q2.onnx", str(tmp_path / "calib.npz"), max_bytes=other + 10, progress=False)


def test_option_conflicts_are_clear(tmp_path):
    from laqonnx.errors import DataError

    path = tmp_path / "m.onnx"
    onnx.save(models.cnn(), str(path))
    np.savez(tmp_path / "c.npz", x=models.random_input((1, 8, 8), n=8))
    with pytest.raises(DataError, match="calibration data is required"):
        laqonnx.quantize(path, tmp_path / "q.onnx", progress=False)
    res = laqonnx.quantize(path, tmp_path / "q.onnx", str(tmp_path / "c.npz"), progress=False)
    with pytest.raises(PlanError, match="budget does not apply"):
        laqonnx.quantize(path, tmp_path / "q2.onnx", plan=res.plan_path, avg_weight_bits=6, progress=False)
    with pytest.raises(OptionError, match="at most one budget"):
        laqonnx.quantize(path, tmp_path / "q3.onnx", str(tmp_path / "c.npz"), avg_weight_bits=6, max_bytes=10**6, progress=False)
    assert issubclass(OptionError, LaqonnxError)
    assert not (tmp_path / "q2.onnx").exists() and not (tmp_path / "q3.onnx").exists()


def test_eps_of_half_the_input_range_is_a_note_and_a_plan_warning(tiny, tmp_path, capsys):
    """--eps 8 meant as 8/255: one note naming the likely intent, recorded in the plan's warnings."""
    model, out, _ = tiny
    np.savez(tmp_path / "calib.npz", x=models.random_input((1, 8, 8), n=8))
    base = ["quantize", str(model), "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "--objective", "mse",
            "--no-adversarial-calib", "--no-guard", "--no-progress"]
    assert main([*base, "--eps", "8"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "half the width" in line]
    assert len(notes) == 1 and "input range [0, 1]" in notes[0] and "did you mean eps/255, 8/255 = 0.03137?" in notes[0]
    assert any("did you mean eps/255, 8/255" in w for w in Plan.load(tmp_path / "out.plan.json").warnings)
    assert main([*base, "--eps", "8/255"]) == 0
    assert "half the width" not in capsys.readouterr().err
    assert not any("half the width" in w for w in Plan.load(tmp_path / "out.plan.json").warnings)


def test_without_torch_quantize_says_the_metric_differs(tiny, tmp_path, capsys, monkeypatch):
    """As analyze does: the fallback metric is a printed note and a plan warning (torch hidden)."""
    import sys

    from laqonnx.quant.scoring import NO_TORCH_NOTE

    model, out, _ = tiny
    np.savez(tmp_path / "calib.npz", x=models.random_input((1, 8, 8), n=8))
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    assert main(["quantize", str(model), "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "--no-adversarial-calib",
                 "--no-progress"]) == 0
    assert f"note: {NO_TORCH_NOTE}" in capsys.readouterr().err.splitlines()
    assert NO_TORCH_NOTE in Plan.load(tmp_path / "out.plan.json").warnings
