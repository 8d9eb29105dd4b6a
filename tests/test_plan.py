"""Plan dataclasses: JSON round trip and validation against the model."""

from __future__ import annotations

import dataclasses
import json

import pytest

from laqonnx.errors import PlanError
from laqonnx.graph import load_model
from laqonnx.quant.metric import ActivationScore, Candidate, WeightScore
from laqonnx.quant.plan import GuardResult, LayerPlan, Plan, TensorRange
from laqonnx.quant.numerics import ActivationQuant, PerChannel, PerTensor, WeightQuant
from tests import models

SHA = "ab" * 32


def _plan(build=models.cnn) -> tuple[Plan, object]:
    pm = load_model(build())
    cands = [
        Candidate(WeightQuant(8, PerChannel(0), "mse"), ActivationQuant(8, "percentile", 99.9)),
        Candidate(WeightQuant(4, PerTensor(), "percentile", 99.5), ActivationQuant(16, "entropy")),
        Candidate(None, ActivationQuant()),
    ]
    layers = []
    for i, layer in enumerate(pm.layers):
        cands_l = [dataclasses.replace(c, weight=None if c.weight is None else dataclasses.replace(c.weight, granularity=PerChannel(layer.channel_axis)) if isinstance(c.weight.granularity, PerChannel) else c.weight) for c in cands]
        scores = tuple(WeightScore(c.weight, 1.5 + k, None if k == 2 else 2.0 / 3.0, 1.0 / 7.0 + k, 8 * (k + 1))
                       for k, c in enumerate(cands_l))
        layers.append(
            LayerPlan(
                name=layer.name, op_type=layer.op_type, weight=layer.weight, input=layer.input, params=100 + i,
                channel_axis=layer.channel_axis, chosen=cands_l[i % 2], scores=scores,
                weight_scale=(0.1, 0.2), weight_zero_point=(0, 0),
            )
        )
    act_scores = (ActivationScore(ActivationQuant(), 0.25, 0.5, 0.75), ActivationScore(ActivationQuant(8, "mse"), 1 / 3, None, 1 / 3))
    ranges = (TensorRange("input", ActivationQuant(), 0.0, 1.0, act_scores), TensorRange("r1", ActivationQuant(8, "mse"), 0.0, 2.5))
    plan = Plan(
        model_sha256=SHA, input_name=pm.input_name, input_shape=pm.input_shape, layers=tuple(layers), ranges=ranges,
        objective="laq", eps=8 / 255, norm="inf", input_range=(-1.0, 1.0), avg_weight_bits=6.0,
        warnings=("a warning",), adversarial_calib="generated (PGD-10 on the float model)",
        activation_stats="clean+adversarial (merged histograms)",
        metric={"engine": "mirror", "examples": 64, "projections": 10, "exact": True, "adversarial_weight": 1.0},
        guard=GuardResult("mse", {"laq": 0.5, "mse": 0.25, "uniform": 1.5}, 64), check={"agreement": 0.96875, "examples": 64},
    )
    return plan, pm


def test_json_round_trip_is_exact():
    plan, _ = _plan()
    text = json.dumps(plan.to_json())
    back = Plan.from_json(json.loads(text))
    assert back == plan
    assert back.to_json() == plan.to_json()


def test_save_load(tmp_path):
    plan, _ = _plan()
    path = plan.save(tmp_path / "p.plan.json")
    assert Plan.load(path) == plan


def test_avg_bits_and_with_choice():
    plan, _ = _plan()
    layers = plan.layers
    expected = sum(lp.params * lp.chosen.weight_bits for lp in layers) / sum(lp.params for lp in layers)
    assert plan.avg_bits == pytest.approx(expected)
    new = plan.with_choice(layers[0].name, Candidate(None, ActivationQuant()))
    assert new.layers[0].chosen.weight is None and new.layers[0].weight_scale is None
    assert new.layers[1:] == layers[1:]
    assert new.avg_bits > plan.avg_bits


def test_validate_accepts_matching_model():
    plan, pm = _plan()
    plan.validate(pm.layers, SHA)


def _edit(plan: Plan, fn) -> dict:
    d = plan.to_json()
    fn(d)
    return d


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.update(version=99), "unsupported plan version"),
        (lambda d: d.update(format="other"), "not a laqonnx plan"),
        (lambda d: d["layers"][0]["chosen"]["weight"].update(bits=5), "weight bits must be 8 or 4"),
        (lambda d: d["layers"][0]["chosen"]["weight"].update(granularity="per_row"), "unknown granularity"),
        (lambda d: d["layers"][0]["chosen"]["activation"].update(method="magic"), "activation method"),
        (lambda d: d["layers"][0].pop("chosen"), "invalid plan"),
        (lambda d: d["ranges"][0].update(rmin=3.0, rmax=1.0), "invalid range"),
    ],
)
def test_malformed_plans_raise_plan_error(edit, match):
    plan, _ = _plan()
    with pytest.raises(PlanError, match=match):
        Plan.from_json(_edit(plan, edit))


def test_validate_rejects_mismatches():
    plan, pm = _plan()
    with pytest.raises(PlanError, match="another model"):
        plan.validate(pm.layers, "cd" * 32)
    renamed = Plan.from_json(_edit(plan, lambda d: d["layers"][0].update(name="nope")))
    with pytest.raises(PlanError, match="layers the model does not have: nope"):
        renamed.validate(pm.layers, SHA)
    dropped = dataclasses.replace(plan, layers=plan.layers[1:])
    with pytest.raises(PlanError, match="no setting for layers"):
        dropped.validate(pm.layers, SHA)
    axis = plan.with_choice(plan.layers[0].name, Candidate(WeightQuant(8, PerChannel(1)), ActivationQuant()))
    with pytest.raises(PlanError, match="per-channel axis 1"):
        axis.validate(pm.layers, SHA)


def test_layers_sharing_an_input_must_share_the_activation():
    plan, pm = _plan(models.concat)
    left, right = plan.layers[0], plan.layers[1]
    assert left.input == right.input == "input"
    bad = plan.with_choice(right.name, Candidate(WeightQuant(), ActivationQuant(8, "mse")))
    bad = bad.with_choice(left.name, Candidate(WeightQuant(), ActivationQuant(8, "minmax")))
    with pytest.raises(PlanError, match="share one activation"):
        bad.validate(pm.layers, SHA)


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="cannot read plan"):
        Plan.load(bad)


def test_layers_sharing_a_weight_must_share_its_setting():
    plan, pm = _plan()
    layers = list(plan.layers)
    layers[1] = dataclasses.replace(layers[1], weight=layers[0].weight)
    bad = dataclasses.replace(plan, layers=tuple(layers))
    with pytest.raises(PlanError, match="must share one weight setting"):
        bad.validate([dataclasses.replace(l, weight=layers[0].weight) if l.name == layers[1].name else l for l in pm.layers], SHA)


def test_version_1_plans_are_read_for_their_settings():
    """A plan of the first metric re-applies: chosen settings and ranges are kept, its scores dropped."""
    plan, pm = _plan()
    d = plan.to_json()
    d["version"] = 1
    d["settings"]["adversarial_calib"] = True
    d["network_bound"] = 4.5
    for lp in d["layers"]:
        lp.update(operator_norm=1.25, gain=0.5, candidates=[{"weight": None, "activation": {"bits": 8}, "lhat": 1.0}])
    old = Plan.from_json(d)
    assert [lp.chosen for lp in old.layers] == [lp.chosen for lp in plan.layers]
    assert all(lp.scores == () for lp in old.layers) and old.adversarial_calib == "generated"
    assert [(r.tensor, r.rmin, r.rmax) for r in old.ranges] == [(r.tensor, r.rmin, r.rmax) for r in plan.ranges]
    assert any("version-1 plan" in w for w in old.warnings)
    old.validate(pm.layers, SHA)
