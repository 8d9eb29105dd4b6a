"""Vocabularies (laqonnx.vocab), OptionError / LaqonnxWarning, and the shared argparse kit."""

from __future__ import annotations

import argparse
import json
import warnings

import onnx
import pytest

import laqonnx
from laqonnx.cli import build_parser, main
from laqonnx.commands._common import parse_floats, parse_positive_fraction, parse_positive_int, parse_subset
from laqonnx.errors import LaqonnxError, LaqonnxWarning, OptionError
from laqonnx.quant.metric import CandidateSpace, ObjectiveConfig
from laqonnx.quant.numerics import ActivationQuant, WeightQuant
from laqonnx.vocab import (
    ActivationMethod,
    AttackName,
    AttackPreset,
    Baseline,
    ChannelOrder,
    Objective,
    ThreatNorm,
    WeightMethod,
)
from tests import models


def _choices(command: str, option: str) -> tuple[str, ...]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if option in a.option_strings)
    return tuple(action.choices)


def test_values_are_the_strings_json_and_plans_use():
    assert ThreatNorm.values() == ("inf", "2")
    assert WeightMethod.values() == ("maxabs", "mse", "percentile")
    assert ActivationMethod.values() == ("minmax", "percentile", "entropy", "mse")
    assert Objective.values() == ("laq", "mse", "lipschitz")
    assert Baseline.values() == ("ort-minmax", "ort-percentile", "ort-entropy")
    assert AttackPreset.values() == ("quick", "standard", "thorough")
    assert ChannelOrder.values() == ("rgb", "bgr", "gray")
    assert WeightMethod.MSE == "mse" and f"{WeightMethod.MSE}" == "mse" and str(ThreatNorm.L2) == "2"
    assert json.dumps({"norm": ThreatNorm.INF, "method": WeightMethod.MSE}) == '{"norm": "inf", "method": "mse"}'


def test_members_are_stored_as_plain_strings():
    """An option given as an enum member is the same option as its string (equal and same hash)."""
    w = WeightQuant(8, method=WeightMethod.MSE)
    assert type(w.method) is str and w == WeightQuant(8, method="mse") and hash(w) == hash(WeightQuant(8, method="mse"))
    a = ActivationQuant(method=ActivationMethod.ENTROPY)
    assert type(a.method) is str and {a: 1}[ActivationQuant(method="entropy")] == 1
    c = ObjectiveConfig(objective=Objective.MSE, norm=ThreatNorm.L2)
    assert (type(c.objective), type(c.norm)) == (str, str) and (c.objective, c.norm) == ("mse", "2")


def test_attack_vocabularies_match_the_registries():
    pytest.importorskip("torch")
    from laqonnx.robustness.attacks import ATTACK_NAMES, ATTACKS, PRESETS

    assert set(ATTACKS) == set(AttackName.values()) and ATTACK_NAMES == AttackName.values()
    assert tuple(PRESETS) == AttackPreset.values()
    assert all(set(p.attacks) <= set(AttackName.values()) for p in PRESETS.values())


@pytest.mark.parametrize("command,option,vocab", [
    ("quantize", "--norm", ThreatNorm), ("quantize", "--objective", Objective), ("quantize", "--baseline", Baseline),
    ("evaluate", "--norm", ThreatNorm), ("evaluate", "--preset", AttackPreset), ("evaluate", "--attacks", AttackName),
    ("demo", "--preset", AttackPreset), ("deploy", "--channels", ChannelOrder),
])
def test_cli_choices_derive_from_the_vocabulary(command, option, vocab):
    assert _choices(command, option) == vocab.values()


@pytest.mark.parametrize("make,match", [
    (lambda: WeightQuant(method="nope"), "weight method must be one of"),
    (lambda: ActivationQuant(method="maxabs"), "activation method must be one of"),
    (lambda: ObjectiveConfig(objective="l1"), "objective must be one of"),
    (lambda: ObjectiveConfig(norm="1"), "norm must be one of"),
    (lambda: CandidateSpace(weight_methods=()), "non-empty tuple"),
    (lambda: WeightQuant(bits=3), "weight bits"),
])
def test_invalid_options_are_option_errors(make, match):
    with pytest.raises(OptionError, match=match) as info:
        make()
    assert isinstance(info.value, LaqonnxError) and isinstance(info.value, ValueError)


def test_deploy_options_are_option_errors():
    from laqonnx.deployment import DeployOptions

    with pytest.raises(OptionError, match="channels must be one of"):
        DeployOptions(channels="cmyk")
    with pytest.raises(OptionError, match="top_k"):
        DeployOptions(top_k=0)
    assert DeployOptions(channels=ChannelOrder.GRAY).channels == "gray"


def test_two_budgets_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(models.cnn(), str(model))
    out = tmp_path / "out.onnx"
    rc = main(["quantize", str(model), "-o", str(out), "--calib", "digits", "--max-bytes", "50000",
               "--avg-weight-bits", "6"])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2
    assert lines == ["laqonnx quantize: error: give at most one budget: avg_weight_bits, max_bytes or max_latency"]
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    with pytest.raises(OptionError, match="at most one budget"):
        laqonnx.quantize(model, out, "digits", avg_weight_bits=6, max_bytes=50000, progress=False)


def test_evaluate_prints_laqonnx_warnings_as_notes_by_class(monkeypatch, capsys, recwarn):
    pytest.importorskip("torch")
    pytest.importorskip("art")
    import laqonnx.robustness.evaluate as ev

    def fake_evaluate(*args, **kwargs):
        warnings.warn("anything at all, whatever its text", LaqonnxWarning)
        warnings.warn("no Lipschitz analysis (a plain UserWarning, not ours)", UserWarning)
        return object()

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    monkeypatch.setattr(ev, "format_table", lambda report: "TABLE")
    assert main(["evaluate", "m.onnx", "--data", "digits", "--eps", "0.1", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "TABLE"
    err = captured.err.splitlines()
    assert "laqonnx evaluate: note: anything at all, whatever its text" in err
    assert not any(line.startswith("laqonnx evaluate: note: no Lipschitz") for line in err)
    # any other warning is shown as Python shows it (warnings.showwarning, which pytest records here)
    shown = [w for w in recwarn if w.category is UserWarning]
    assert [str(w.message) for w in shown] == ["no Lipschitz analysis (a plain UserWarning, not ours)"]


@pytest.mark.parametrize("text,value", [("1", 1), (" 12 ", 12)])
def test_parse_positive_int(text, value):
    assert parse_positive_int(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "1.5", "x", ""])
def test_parse_positive_int_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected a positive integer"):
        parse_positive_int(text)


def test_parse_positive_fraction_floats_and_subset():
    assert parse_positive_fraction("8/255") == pytest.approx(8 / 255) and parse_positive_fraction("1e-4") == 1e-4
    with pytest.raises(argparse.ArgumentTypeError, match="must be > 0"):
        parse_positive_fraction("0")
    assert parse_floats("0.5,0.25") == (0.5, 0.25)
    for bad in ("a,b", "1,nan", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_floats(bad)
    parse = parse_subset(WeightMethod.values())
    assert parse("mse, maxabs,mse") == ("mse", "maxabs")
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated subset of maxabs,mse,percentile"):
        parse("mse,minmax")
