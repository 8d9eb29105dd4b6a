"""The after-writing latency check: a quantized model slower than float is reported (fixed fake timings)."""

from __future__ import annotations

import warnings

import numpy as np

import laqonnx
from laqonnx.errors import LaqonnxWarning
from laqonnx.quant import workflow
from laqonnx.quant.latency_check import LatencyCheck, check_latency, slower_note
from tests import models


def test_slower_note_has_both_figures():
    assert slower_note(LatencyCheck(2.0, 1.5), emit=False) is None
    assert slower_note(LatencyCheck(2.0, 2.1), emit=False) is None  # within the noise margin
    note = slower_note(LatencyCheck(0.5, 0.75), emit=False)
    assert "0.75 ms" in note and "0.5 ms" in note and "1.50x" in note


def test_quantize_warns_when_slower(monkeypatch, tmp_path):
    seen = []

    def fake(float_model, quantized, input_shape=None, **kw):
        seen.append(tuple(input_shape))
        return LatencyCheck(float_ms=0.02, quantized_ms=0.05)

    monkeypatch.setattr(workflow, "check_latency", fake)
    model = models.mlp(seed=1)
    x = models.random_input(model, n=32, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = laqonnx.quantize(model, tmp_path / "q.onnx", x, eps=0.0, adversarial_calib=False, guard=False,
                               progress=False, latency_check=True)
    assert seen == [(16,)]
    assert res.latency == LatencyCheck(0.02, 0.05)
    notes = [w for w in res.warnings if "slower than the float model" in w]
    assert notes and "0.05 ms" in notes[0] and "0.02 ms" in notes[0]
    assert any(issubclass(c.category, LaqonnxWarning) and "slower" in str(c.message) for c in caught)
    assert any("slower than the float model" in w for w in res.plan.warnings)
    assert res.to_json()["latency"]["ratio"] == 2.5


def test_off_by_default(monkeypatch, tmp_path):
    monkeypatch.setattr(workflow, "check_latency", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    model = models.mlp(seed=1)
    res = laqonnx.quantize(model, tmp_path / "q.onnx", models.random_input(model, n=16), eps=0.0,
                           adversarial_calib=False, guard=False, progress=False)
    assert res.latency is None


def test_check_latency_measures_both():
    model = models.mlp(seed=2)
    c = check_latency(model, model, (16,), runs=5)
    assert c.float_ms > 0 and c.quantized_ms > 0 and np.isfinite(c.ratio)
