"""``laqonnx.evaluate`` and ``laqonnx evaluate``: report contents, JSON, CLI, input validation."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import numpy as np
import onnx
import pytest
from onnx import helper

import laqonnx
from laqonnx.cli import main
from laqonnx.commands._common import parse_fraction, parse_shape
from laqonnx.errors import DataError, ModelError
from laqonnx.robustness.attacks import ATTACK_NAMES
from laqonnx.robustness.evaluate import SWEEP_MULTIPLES, EvaluationReport, format_table
from laqonnx.robustness.ort_estimator import OrtModel
from tests import models as M
from tests._digits_model import digits_cnn, quantize


@pytest.fixture(scope="module")
def digits():
    _, model, x, y, calib = digits_cnn()
    qdq = quantize(model, calib, per_channel=True)
    return model, qdq, x[:60], y[:60]


def test_public_api_report(digits) -> None:
    model, qdq, x, y = digits
    report = laqonnx.evaluate([model, qdq], (x, y), 8 / 255, attacks=["fgsm", "pgd", "transfer", "square"],
                              reference=model, latency=False, sweep=True, progress=False)
    assert isinstance(report, laqonnx.EvaluationReport) and len(report.models) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.eps = 1.0  # type: ignore[misc]
    for proto, m in zip((model, qdq), report.models):
        ort_acc = float((OrtModel(proto).labels(x) == y).mean())
        assert m.clean_accuracy == pytest.approx(ort_acc)
        assert m.mirror_agreement_clean == 1.0 and m.white_box_reliable
        assert m.mirror_agreement_adversarial is not None and m.mirror_agreement_adversarial >= 0.99
        assert 0 <= m.robust_accuracy["worst_case"] <= min(v for k, v in m.robust_accuracy.items())
        assert m.robust_accuracy["worst_case"] <= m.clean_accuracy
        sweep = m.robust_vs_eps
        assert [p["eps"] for p in sweep] == pytest.approx([k * 8 / 255 for k in SWEEP_MULTIPLES])
        assert sweep[0]["robust_accuracy"] == pytest.approx(m.clean_accuracy)
        assert sweep[-1]["robust_accuracy"] <= sweep[1]["robust_accuracy"]
    # a reference given as a proto is never "the same file": transfer runs on both models
    assert "transfer" in report.models[0].robust_accuracy and "transfer" in report.models[1].robust_accuracy
    data = json.loads(json.dumps(report.to_json()))
    assert data["eps"] == pytest.approx(8 / 255) and data["norm"] == "inf"
    entry = data["models"][1]
    for key in ("path", "clean_accuracy", "robust_accuracy", "mirror_agreement", "gradient_masking", "latency_ms",
                "size_bytes", "robust_vs_eps"):
        assert key in entry
    assert entry["size_bytes"] == qdq.ByteSize() and entry["latency_ms"] is None
    assert set(entry["robust_accuracy"]) == {"fgsm", "pgd", "transfer", "square", "worst_case"}
    table = format_table(report)
    assert "worst_case" in table and "transfer" in table


def test_unsupported_op_skips_white_box_but_still_attacks(digits) -> None:
    model, _, x, y = digits
    odd = onnx.ModelProto()
    odd.CopyFrom(model)
    out = odd.graph.output[0].name
    odd.graph.node[-1].output[0] = "pre"
    # Shrink with lambd = bias = 0 is the identity, and an op the mirror does not evaluate (Neg, used
    # here before, now has a mirror handler)
    odd.graph.node.extend([helper.make_node("Shrink", ["pre"], ["n1"], lambd=0.0, bias=0.0),
                           helper.make_node("Shrink", ["n1"], [out], lambd=0.0, bias=0.0)])
    report = laqonnx.evaluate(odd, (x, y), 0.1, attacks=["pgd", "square"], latency=False, progress=False)
    m = report.models[0]
    assert "Shrink" in m.skipped["pgd"] and "square" in m.robust_accuracy
    assert m.mirror_agreement is None and not m.white_box_reliable
    assert "unreliable" in format_table(report)


def test_final_softmax_model_is_attacked_on_logits(digits) -> None:
    model, _, x, y = digits
    soft = onnx.ModelProto()
    soft.CopyFrom(model)
    out = soft.graph.output[0].name
    soft.graph.node[-1].output[0] = "z"
    soft.graph.node.append(helper.make_node("Softmax", ["z"], [out], axis=1))
    a = laqonnx.evaluate(model, (x, y), 0.1, attacks=["pgd"], latency=False, progress=False).models[0]
    b = laqonnx.evaluate(soft, (x, y), 0.1, attacks=["pgd"], latency=False, progress=False).models[0]
    assert b.softmax_stripped and not a.softmax_stripped
    assert b.robust_accuracy == a.robust_accuracy


@pytest.mark.parametrize("data,error", [
    ((np.full((4, 1, 8, 8), 2.0, np.float32), np.zeros(4, np.int64)), "[0, 1]"),
    ((np.zeros((4, 1, 8, 8), np.float32), np.full(4, 12)), "outputs"),
    ((np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.float32)), "integers"),
    ((np.zeros((4, 1, 6, 6), np.float32), np.zeros(4, np.int64)), "the model expects (1, 8, 8)"),
])
def test_bad_data_raises_data_error(digits, data, error: str) -> None:
    with pytest.raises(DataError, match=re.escape(error)):
        laqonnx.evaluate(digits[0], data, 0.1, attacks=["fgsm"], latency=False, progress=False)


@pytest.mark.parametrize("kwargs", [{"preset": "huge"}, {"attacks": ["pgd", "cw"]}, {"norm": "1"}, {"eps": -1.0}])
def test_bad_options_raise_value_error(kwargs: dict) -> None:
    args = {"eps": 0.1, **kwargs}
    with pytest.raises(ValueError):
        laqonnx.evaluate(M.cnn(), (M.random_input(M.cnn(), 2), np.zeros(2, np.int64)), latency=False,
                         progress=False, **args)


def test_cli_json_report_and_latency(digits, tmp_path, capsys) -> None:
    model, qdq, x, y = digits
    onnx.save(model, tmp_path / "f.onnx")
    onnx.save(qdq, tmp_path / "q.onnx")
    np.savez(tmp_path / "test.npz", x=x[:30], y=y[:30])
    out = tmp_path / "eval.json"
    code = main(["evaluate", str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), "--data", str(tmp_path / "test.npz"),
                 "--eps", "8/255", "--reference", str(tmp_path / "f.onnx"), "--attacks", "fgsm", "pgd", "transfer",
                 "--json", str(out), "--report", str(tmp_path / "rep"), "--limit", "20", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "q.onnx" in printed and "worst_case" in printed
    data = json.loads(out.read_text())
    assert data["eps"] == pytest.approx(8 / 255) and len(data["models"]) == 2
    q = data["models"][1]
    assert q["n_examples"] == 20 and set(q["latency_ms"]) >= {"p50", "p90", "p99"}
    assert q["latency_ms"]["p50"] > 0 and q["size_bytes"] == (tmp_path / "q.onnx").stat().st_size
    assert data["models"][0]["skipped_attacks"]["transfer"].startswith("the model is the float reference")
    assert len(q["robust_vs_eps"]) == len(SWEEP_MULTIPLES)
    assert (tmp_path / "rep" / "report.md").is_file()
    assert {"robust_vs_eps.png", "lipschitz.png"} <= {p.name for p in (tmp_path / "rep").glob("*.png")}


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    onnx.save(M.cnn(), tmp_path / "m.onnx")
    assert main(["evaluate", str(tmp_path / "missing.onnx"), "--data", "digits", "--eps", "0.1"]) == 2
    assert "model file not found" in capsys.readouterr().err
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 1, 8, 8), np.float32), y=np.zeros(3, np.int64))
    assert main(["evaluate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--eps", "0.1",
                 "--json", str(tmp_path / "m.onnx")]) == 2
    assert "overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path / "m.onnx"), "--data", "digits", "--eps", "8/0"])
    assert "8/255" in capsys.readouterr().err


def test_cli_attack_choices_match_the_registry() -> None:
    from laqonnx.commands.evaluate import _ATTACKS

    assert _ATTACKS == ATTACK_NAMES


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.03", 0.03), (" 1/2 ", 0.5), ("1e-2", 0.01),
                                        ("0", 0.0), ("2/3.0", 2 / 3)])
def test_parse_fraction(text: str, value: float) -> None:
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "abc", "1/0", "-0.1", "-1/2", "inf", "nan", "1/2/3"])
def test_parse_fraction_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_fraction(text)


@pytest.mark.parametrize("text,shape", [("1,28,28", (1, 28, 28)), ("3x32x32", (3, 32, 32)), ("(3, 8, 8)", (3, 8, 8)),
                                        ("10", (10,))])
def test_parse_shape(text: str, shape: tuple[int, ...]) -> None:
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1,a", "0,3", "-1,2", "1.5"])
def test_parse_shape_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_shape(text)


def test_report_type_is_exported() -> None:
    assert laqonnx.EvaluationReport is EvaluationReport
    with pytest.raises(ModelError):
        laqonnx.evaluate(str("/nonexistent/model.onnx"), (np.zeros((1, 1, 8, 8), np.float32), np.zeros(1, np.int64)),
                         0.1, progress=False)


@pytest.mark.parametrize("clean,adv,reliable", [(1.0, 1.0, True), (1.0, 0.99, True), (1.0, 0.985, False),
                                                (0.98, None, False), (None, None, False)])
def test_white_box_reliability_threshold(clean, adv, reliable: bool) -> None:
    from laqonnx.robustness.attacks import Masking
    from laqonnx.robustness.evaluate import ModelEvaluation

    m = ModelEvaluation(path="m.onnx", n_examples=10, clean_accuracy=0.9, robust_accuracy={"pgd": 0.5, "worst_case": 0.5},
                        skipped={}, attack_seconds={}, mirror_agreement_clean=clean, mirror_agreement_adversarial=adv,
                        masking=Masking(False, None, None, 0.0, 0, "n/a"), size_bytes=1)
    assert m.white_box_reliable is reliable
    assert m.to_json()["white_box_reliable"] is reliable
    table = format_table(EvaluationReport(eps=0.1, norm="inf", preset="quick", attacks=("pgd",), models=(m,)))
    assert ("white-box results are unreliable" in table) is not reliable


@pytest.fixture()
def tiny_eval(tmp_path):
    onnx.save(M.cnn(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=M.random_input(M.cnn(), 6), y=rng.integers(0, 10, 6))
    (tmp_path / "file.txt").write_text("x")
    return ["evaluate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--eps", "0.1",
            "--attacks", "fgsm", "--no-latency", "--no-progress"]


@pytest.mark.parametrize("where", ["under-a-file", "a-file", "proc"])
def test_cli_report_folder_is_checked_before_any_attack(tiny_eval, tmp_path, capsys, monkeypatch, where) -> None:
    import os

    if where == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    folder = {"under-a-file": tmp_path / "file.txt" / "rep", "a-file": tmp_path / "file.txt", "proc": "/proc/rep"}[where]

    def no_work(*a, **k):
        raise AssertionError("attacks started before the report folder was checked")

    monkeypatch.setattr("laqonnx.robustness.evaluate._evaluate_one", no_work)
    assert main([*tiny_eval, "--report", str(folder), "--json", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("laqonnx evaluate: error: cannot") and "\n" not in err and "folder" in err
    assert not (tmp_path / "e.json").exists()


def test_cli_report_failing_late_still_prints_and_writes_json(tiny_eval, tmp_path, capsys, monkeypatch) -> None:
    from laqonnx.errors import OutputError

    def fail(*a, **k):
        raise OutputError("cannot write rep/report.md: No space left on device")

    monkeypatch.setattr("laqonnx.report.write_report", fail)
    monkeypatch.setattr("laqonnx.robustness.evaluate._analyses", lambda *a: {})
    code = main([*tiny_eval, "--report", str(tmp_path / "rep"), "--json", str(tmp_path / "e.json")])
    out, err = capsys.readouterr()
    assert code == 2 and "worst_case" in out and "m.onnx" in out
    assert json.loads((tmp_path / "e.json").read_text())["models"][0]["n_examples"] == 6
    last = err.strip().splitlines()[-1]
    assert last == "laqonnx evaluate: error: cannot write rep/report.md: No space left on device"
    assert "Traceback" not in err


@pytest.mark.parametrize("command, positional", [("analyze", ["m.onnx"]), ("quantize", ["m.onnx", "-o", "q.onnx"]),
                                                 ("evaluate", ["m.onnx", "--data", "digits", "--eps", "0.1"]),
                                                 ("demo", [])])
@pytest.mark.parametrize("spelling", ["--no-progress", "--quiet"])
def test_one_progress_spelling_on_every_command(command, positional, spelling) -> None:
    from laqonnx.cli import build_parser

    assert build_parser().parse_args([command, *positional, spelling]).no_progress is True
