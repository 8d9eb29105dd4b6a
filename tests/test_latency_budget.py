"""The knapsack under a latency budget, over a fixed fake cost table: brute force on small cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from laqonnx.errors import OptionError, PlanError
from laqonnx.graph import load_model
from laqonnx.quant.costs import LATENCY_UNITS_PER_MS, MaxLatency, choose
from laqonnx.quant.latency_costs import LatencyTable, attribute
from laqonnx.quant.metric import ActivationQuant, ActivationScore, LayerTerms, Scored, WeightScore
from laqonnx.quant.numerics import PerChannel, WeightQuant
from tests import models

SETTINGS = (None, WeightQuant(8, PerChannel(0)), WeightQuant(4, PerChannel(0)))


def _case(seed: int):
    rng = np.random.default_rng(seed)
    pm = load_model(models.mlp(seed=seed, dims=(16, 12, 10, 8, 5)), allow_quantized=False)
    layers, costs = [], {}
    for layer in pm.layers:
        metric = np.sort(rng.uniform(0, 1, 3))[::-1] * [0.0, 1.0, 1.0]  # float 0, int8 < int4 (usually)
        scores = tuple(WeightScore(s, float(m), None, float(m) + rng.uniform(0, 0.3) * (s is not None), 32 if s is None else s.bits)
                       for s, m in zip(SETTINGS, metric))
        layers.append(LayerTerms(layer, scores))
        # latency: int8 fastest, int4 in between or slower, float in between: arbitrary fixed numbers
        costs[layer.name] = {"float": float(rng.uniform(0.2, 1.0)), "int8": float(rng.uniform(0.05, 0.5)),
                             "int4": float(rng.uniform(0.05, 1.2))}
    tensors = {lt.layer.input: (ActivationScore(ActivationQuant(), 0.0, None, 0.0),) for lt in layers}
    table = LatencyTable(costs, rest_ms=0.1, float_ms=0.1 + sum(c["float"] for c in costs.values()))
    return pm, Scored(tuple(layers), tensors), table


def _brute(scored: Scored, table: LatencyTable, limit_ms: float) -> float | None:
    best = None
    units = int(np.floor(limit_ms * LATENCY_UNITS_PER_MS))
    for pick in itertools.product(*[range(len(lt.scores)) for lt in scored.layers]):
        cost = round(table.rest_ms * LATENCY_UNITS_PER_MS) + sum(
            round(table.cost_ms(lt.layer.name, lt.scores[k].setting) * LATENCY_UNITS_PER_MS) for lt, k in zip(scored.layers, pick))
        if cost <= units:
            v = sum(lt.scores[k].metric for lt, k in zip(scored.layers, pick))
            best = v if best is None or v < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rel", [0.3, 0.5, 0.8, 1.2])
def test_latency_knapsack_equals_brute_force(seed, rel):
    pm, scored, table = _case(seed)
    budget = MaxLatency(relative=rel)
    expected = _brute(scored, table, rel * table.float_ms)
    if expected is None:
        with pytest.raises(PlanError, match="max-latency"):
            choose(scored, pm, budget, latency=table)
        return
    got = choose(scored, pm, budget, latency=table)
    assert got.value == pytest.approx(expected, abs=1e-9)
    chosen = {lt.layer.name: lt.scores[got.weights[lt.layer.name]].setting for lt in scored.layers}
    assert table.total_ms(chosen) <= rel * table.float_ms + 1e-9


def test_absolute_budget_and_validation():
    pm, scored, table = _case(1)
    got = choose(scored, pm, MaxLatency(ms=table.float_ms), latency=table)
    assert got.value == pytest.approx(_brute(scored, table, table.float_ms), abs=1e-9)
    with pytest.raises(OptionError, match="latency table"):
        choose(scored, pm, MaxLatency(ms=1.0))
    with pytest.raises(PlanError, match="outside its layers"):
        choose(scored, pm, MaxLatency(ms=0.01), latency=table)
    for bad in [{}, {"ms": 1.0, "relative": 0.5}, {"ms": -1.0}, {"relative": float("nan")}, {"ms": True}]:
        with pytest.raises(OptionError):
            MaxLatency(**bad)


def test_attribution_follows_qdq_plumbing():
    from onnx import numpy_helper

    from laqonnx.quant.lower import LoweringSpec, lower, quantized_tensors
    from laqonnx.quant.numerics import weight_qparams

    model = models.mlp(seed=0, dims=(16, 12, 5))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q = lower(model, LoweringSpec(weights={w: weight_qparams(inits[w], WeightQuant(8)) for w in ("w0", "w1")},
                                  ranges={t: (-2.0, 2.0) for t in quantized_tensors(model)}))
    times = {n.name: 1.0 for n in q.graph.node}
    per, rest = attribute(times, q, ["fc0", "fc1"])
    assert per["fc0"] >= 2 and per["fc1"] >= 2  # the layer and the QDQ pairs around it
    assert sum(per.values()) + rest == len(times)


def test_quantize_under_max_latency_with_a_fake_table(monkeypatch, tmp_path):
    """End to end with a given table (no profiling) and a fake measurement after writing."""
    import laqonnx
    from laqonnx.quant import workflow
    from laqonnx.quant.latency_check import LatencyCheck

    model = models.mlp(seed=4, dims=(16, 12, 10, 5))
    # int4 much slower than int8 on fc0 and fc1, faster on fc2: a tight budget must keep fc0/fc1 int8
    costs = {"fc0": {"float": 1.0, "int8": 0.2, "int4": 2.0}, "fc1": {"float": 1.0, "int8": 0.2, "int4": 2.0},
             "fc2": {"float": 1.0, "int8": 0.3, "int4": 0.25}}
    table = LatencyTable(costs, rest_ms=0.1, float_ms=3.1)
    monkeypatch.setattr(workflow, "check_latency", lambda *a, **k: LatencyCheck(float_ms=3.0, quantized_ms=1.0))
    x = models.random_input(model, n=32, seed=3)
    res = laqonnx.quantize(model, tmp_path / "q.onnx", x, eps=0.0, adversarial_calib=False, guard=False, progress=False,
                           max_latency="0.25x", latency_table=table)
    bits = {lp.name: lp.chosen.weight.bits for lp in res.plan.layers}
    assert bits["fc0"] == 8 and bits["fc1"] == 8
    assert any("latency budget 0.25x" in w for w in res.plan.warnings)
    assert any("the written model measures 1 ms" in w and "0.75 ms" in w and "misses" in w for w in res.warnings)
    with pytest.raises(PlanError, match="max-latency"):
        laqonnx.quantize(model, tmp_path / "r.onnx", x, eps=0.0, adversarial_calib=False, guard=False, progress=False,
                         max_latency="0.1x", latency_table=table)
    with pytest.raises(OptionError, match="max-latency takes"):
        laqonnx.quantize(model, tmp_path / "s.onnx", x, max_latency="fast", progress=False)
