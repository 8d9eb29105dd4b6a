"""The robust guard: robust agreement against the exact worst case of linear models, the keep rule
against brute force, the plan's record of it, and the CLI."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from laqonnx.cli import main
from laqonnx.errors import OptionError
from laqonnx.quant.guard import GuardEntry, RobustGuard, keep, robust_agreements
from laqonnx.quant.plan import GuardResult

pytest.importorskip("torch")


def _linear2(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """Two-class linear classifier ``z = x W^T + b`` (Gemm, transB)."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w", "b"], ["logits"], name="fc", transB=1)], "lin2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", w.shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(b.astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _exact_robust(w: np.ndarray, b: np.ndarray, x: np.ndarray, labels: np.ndarray, eps: float) -> float:
    """L-inf worst case of a two-class linear model, in closed form: example i keeps label y iff its
    margin (w_y - w_o) . x + (b_y - b_o) stays positive after the adversary's -eps * ||w_y - w_o||_1."""
    d = w[labels] - w[1 - labels]
    margin = (d * x).sum(1) + b[labels] - b[1 - labels] - eps * np.abs(d).sum(1)
    return float(np.mean(margin > 0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_robust_agreement_of_linear_models_is_the_exact_worst_case(seed):
    # PGD's signed steps on a linear model all point to the same corner, and 10 steps of 0.25 eps
    # reach it from any random start: its robust agreement is the closed-form worst case (inputs
    # far inside the input range, so no clipping)
    rng = np.random.default_rng(seed)
    dim, n, eps = 12, 200, 0.1
    w_ref, b_ref = rng.normal(0, 1, (2, dim)), rng.normal(0, 0.1, 2)
    x = rng.uniform(-1, 1, (n, dim)).astype(np.float32)
    candidates = {"same": (w_ref, b_ref), "noisy": (w_ref + rng.normal(0, 0.3, (2, dim)), b_ref),
                  "scaled": (2.0 * w_ref, 2.0 * b_ref)}
    got = robust_agreements({k: _linear2(*v) for k, v in candidates.items()}, _linear2(w_ref, b_ref), "input",
                            "logits", x, eps, "inf", (-10.0, 10.0), RobustGuard(examples=n, steps=10))
    labels = (x @ w_ref.T + b_ref).argmax(1)
    for name, (w, b) in candidates.items():
        assert got[name] == pytest.approx(_exact_robust(w, b, x.astype(np.float64), labels, eps), abs=1.0 / n), name
    assert got["same"] == got["scaled"]  # scaling the logits changes the loss, not the robustness
    assert 0 < got["same"] < 1


def test_a_candidate_that_disagrees_is_attacked_towards_the_reference_label():
    # the candidate predicts the other class on every example: attacking its own prediction would
    # push it back to the reference label and count as robust; against the reference label it never is
    rng = np.random.default_rng(3)
    w, b = rng.normal(0, 1, (2, 8)), np.zeros(2)
    x = rng.uniform(-1, 1, (64, 8)).astype(np.float32)
    got = robust_agreements({"flipped": _linear2(-w, b)}, _linear2(w, b), "input", "logits", x, 0.5, "inf",
                            (-10.0, 10.0), RobustGuard(examples=64))
    assert got["flipped"] == 0.0


def test_keep_is_the_lowest_loss_among_the_most_robust_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(200):
        k = int(rng.integers(1, 6))
        names = [f"p{i}" for i in range(k)]
        entries = [GuardEntry(n, 0.0, None, float(rng.uniform())) for n in names]
        robust = {n: float(rng.choice([0.80, 0.81, 0.85, 0.90, 0.905])) for n in names}
        tol = float(rng.choice([0.0, 0.01, 0.05]))
        best = max(robust.values())
        expect = min((e for e in entries if robust[e.name] >= best - tol - 1e-12), key=lambda e: e.loss).name
        assert keep(entries, robust, tol) == expect
        assert keep(entries, None) == min(entries, key=lambda e: e.loss).name


def test_robust_guard_options_are_validated():
    for bad in (dict(examples=0), dict(steps=True), dict(tolerance=1.0), dict(tolerance=-0.1)):
        with pytest.raises(OptionError):
            RobustGuard(**bad)


def test_guard_result_round_trips_with_and_without_robust_figures():
    plain = GuardResult("mse", {"mse": 0.1, "laq": 0.2}, 64)
    assert GuardResult.from_json(plain.to_json()) == plain and "robust" not in plain.to_json()
    rich = GuardResult("laq", {"mse": 0.1, "laq": 0.2}, 64, {"mse": 0.8, "laq": 0.9}, 128)
    assert GuardResult.from_json(rich.to_json()) == rich


def test_plan_model_with_the_robust_guard_keeps_by_the_rule_and_records_it():
    from laqonnx.graph import load_model
    from laqonnx.quant.costs import AvgBits
    from laqonnx.quant.metric import CandidateSpace
    from laqonnx.quant.numerics import PerChannel, PerTensor
    from laqonnx.quant.planning import QuantizeOptions, plan_model
    from tests._digits_model import digits_cnn

    pm = load_model(digits_cnn()[1])
    space = CandidateSpace(weight_bits=(8, 4), granularities=(PerTensor(), PerChannel()), weight_methods=("maxabs", "mse"),
                           activation_methods=("minmax",), rounding="nearest")
    rg = RobustGuard(examples=48, steps=5, tolerance=0.02)
    planned = plan_model(pm, "digits", QuantizeOptions(eps=0.1, budget=AvgBits(5.0), calib_limit=96, candidates=space,
                                                      guard=rg), progress=False)
    g = planned.plan.guard
    assert g.robust is not None and set(g.robust) == set(g.losses) >= {"laq", "mse", "lipschitz", "uniform"}
    assert g.robust_examples == 48 and all(0 <= v <= 1 for v in g.robust.values())
    entries = [GuardEntry(n, 0.0, None, v) for n, v in g.losses.items()]
    assert g.kept == keep(entries, g.robust, rg.tolerance)
    # the recorded figure is the kept model's own: recomputed on the lowered model that is written
    again = robust_agreements({"kept": planned.lowered}, pm.model, pm.input_name, pm.output_name,
                              planned.calibration.data.clean, 0.1, "inf", planned.calibration.input_range, rg)
    assert again["kept"] == pytest.approx(g.robust[g.kept])
    # at eps 0 there is no attack: the guard falls back to the measured loss alone
    flat = plan_model(pm, "digits", QuantizeOptions(eps=0.0, budget=AvgBits(5.0), calib_limit=96, candidates=space,
                                                   guard=rg), progress=False)
    assert flat.plan.guard is None or flat.plan.guard.robust is None


@pytest.mark.parametrize("extra", [["--no-guard"], ["--plan", "p.json"]])
def test_robust_guard_with_no_guard_or_a_plan_is_one_line_exit_2(tmp_path, capsys, extra):
    from tests._digits_model import digits_cnn

    model = tmp_path / "m.onnx"
    onnx.save(digits_cnn()[1], str(model))
    out = tmp_path / "q.onnx"
    rc = main(["quantize", str(model), "-o", str(out), "--calib", "digits", "--robust-guard", *extra, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--robust-guard" in err and len(err.splitlines()) == 1 and not out.exists()


def test_linear_closed_form_matches_brute_force_corners():
    # the closed form above is itself checked against every corner of a small L-inf ball
    rng = np.random.default_rng(5)
    w, b = rng.normal(0, 1, (2, 4)), rng.normal(0, 0.1, 2)
    x = rng.uniform(-1, 1, (30, 4))
    labels = (x @ w.T + b).argmax(1)
    eps = 0.2
    corners = np.array(list(itertools.product([-eps, eps], repeat=4)))
    keeps = [all(((xi + c) @ w.T + b).argmax() == y for c in corners) for xi, y in zip(x, labels)]
    assert _exact_robust(w, b, x, labels, eps) == pytest.approx(np.mean(keeps))
