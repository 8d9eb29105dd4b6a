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


A16 = ActivationQuant(16)


def _case_a16(seed: int):
    """Each layer input has an 8- and a 16-bit candidate; a 16-bit input makes the layer cost its
    ``a16`` (unfused) time whatever its weight bits, and the layer before it (the QuantizeLinear after
    it turns 16-bit) its a16 time over its int8 time, whatever that layer chose (conservative). A float
    layer is never offered a 16-bit input."""
    pm, scored, table = _case(seed)
    rng = np.random.default_rng(100 + seed)
    costs = {n: {**c, "a16": float(rng.uniform(0.3, 1.1))} for n, c in table.costs.items()}
    tensors = {t: (ActivationScore(ActivationQuant(), float(m8), None, float(m8)), ActivationScore(A16, 0.0, None, 0.0))
               for t, m8 in zip(scored.tensors, rng.uniform(0, 0.6, len(scored.tensors)))}
    return pm, Scored(scored.layers, tensors), LatencyTable(costs, table.rest_ms, table.float_ms)


def _brute_a16(scored: Scored, table: LatencyTable, limit_ms: float) -> float | None:
    best = None
    units = int(np.floor(limit_ms * LATENCY_UNITS_PER_MS))
    for pick in itertools.product(*[range(len(lt.scores)) for lt in scored.layers]):
        for acts in itertools.product(*[range(2) for _ in scored.layers]):
            if any(a == 1 and lt.scores[k].setting is None for lt, k, a in zip(scored.layers, pick, acts)):
                continue  # a 16-bit activation in front of a float layer is not offered
            cost, value = round(table.rest_ms * LATENCY_UNITS_PER_MS), 0.0
            for i, (lt, k, a) in enumerate(zip(scored.layers, pick, acts)):
                act = scored.tensors[lt.layer.input][a]
                cost += round(table.cost_ms(lt.layer.name, lt.scores[k].setting, act.setting) * LATENCY_UNITS_PER_MS)
                if act.setting.bits == 16 and i > 0:  # MLP chain: layer i-1's output QuantizeLinear turns 16-bit
                    before = table.costs[scored.layers[i - 1].layer.name]
                    cost += round(max(0.0, before["a16"] - before["int8"]) * LATENCY_UNITS_PER_MS)
                value += lt.scores[k].metric + act.metric
            if cost <= units and (best is None or value < best):
                best = value
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rel", [0.4, 0.7, 1.1])
def test_latency_knapsack_with_16_bit_activations_equals_brute_force(seed, rel):
    pm, scored, table = _case_a16(seed)
    expected = _brute_a16(scored, table, rel * table.float_ms)
    if expected is None:
        with pytest.raises(PlanError, match="max-latency"):
            choose(scored, pm, MaxLatency(relative=rel), latency=table)
        return
    got = choose(scored, pm, MaxLatency(relative=rel), latency=table)
    assert got.value == pytest.approx(expected, abs=1e-9)
    weights = {lt.layer.name: lt.scores[got.weights[lt.layer.name]].setting for lt in scored.layers}
    acts = {lt.layer.name: scored.tensors[lt.layer.input][got.activations[lt.layer.input]].setting for lt in scored.layers}
    assert table.total_ms(weights, acts) <= rel * table.float_ms + 1e-9


def test_a16_cost_key_and_int4_conv_is_not_offered_under_a_latency_budget():
    from laqonnx.quant.latency_costs import precision_key

    w8 = WeightQuant(8, PerChannel(0))
    assert [precision_key(None, A16), precision_key(w8, A16), precision_key(w8, None), precision_key(w8, ActivationQuant())] == \
        ["float", "a16", "int8", "int8"]
    pm = load_model(models.cnn(seed=0, hw=6), allow_quantized=False)
    conv = [lay for lay in pm.layers if lay.op_type == "Conv"]
    assert conv
    settings = (WeightQuant(8, PerChannel(0)), WeightQuant(4, PerChannel(0)))
    # int4 is better by the metric and (by this table) faster: a latency budget still never offers it on a Conv
    layers = tuple(LayerTerms(lay, tuple(WeightScore(s, m, None, m, s.bits) for s, m in zip(settings, (1.0, 0.1))))
                   for lay in pm.layers)
    costs = {lay.name: {"float": 1.0, "int8": 0.5, "int4": 0.1} for lay in pm.layers}
    table = LatencyTable(costs, rest_ms=0.0, float_ms=float(len(costs)))
    tensors = {lt.layer.input: (ActivationScore(ActivationQuant(), 0.0, None, 0.0),) for lt in layers}
    got = choose(Scored(layers, tensors), pm, MaxLatency(relative=2.0), latency=table)
    for lt in layers:
        bits = lt.scores[got.weights[lt.layer.name]].setting.bits
        assert bits == (8 if lt.layer.op_type == "Conv" else 4), lt.layer.name


def test_quantize_under_max_latency_measures_a16_costs_and_records_the_budget(monkeypatch, tmp_path):
    """Real profiling on a small MLP: the table has an a16 cost per layer, the plan records the budget,
    its estimate and the written model's measurement, and survives its JSON round trip."""
    import laqonnx
    from laqonnx.quant.plan import Plan

    monkeypatch.setenv("LAQONNX_CACHE", str(tmp_path / "cache"))
    model = models.mlp(seed=2, dims=(32, 64, 64, 5))
    x = models.random_input(model, n=32, seed=1)
    res = laqonnx.quantize(model, tmp_path / "q.onnx", x, eps=0.0, adversarial_calib=False, guard=False, progress=False,
                           max_latency="1.5x")
    plan = res.plan
    assert plan.max_latency == {"relative": 1.5, "batch": 1}
    lat = plan.latency
    assert lat["limit_ms"] == pytest.approx(1.5 * lat["float_ms"])
    assert 0 < lat["estimate_ms"] <= lat["limit_ms"] + 1e-9
    assert lat["measured_ms"] > 0 and lat["float_measured_ms"] > 0 and isinstance(lat["within"], bool)
    assert lat["measured_ms"] == res.latency.quantized_ms
    again = Plan.load(res.plan_path)
    assert again.max_latency == plan.max_latency and again.latency == plan.latency
    table_files = list((tmp_path / "cache" / "latency").glob("*.json"))
    assert len(table_files) == 1
    import json

    costs = json.loads(table_files[0].read_text())["costs"]
    assert set(costs) == {lp.name for lp in plan.layers}
    assert all(set(per) == {"float", "int8", "int4", "a16"} for per in costs.values())
    scored_bits = {r.activation.bits for lp in plan.layers for r in [lp.chosen]}
    assert scored_bits <= {8, 16}
    assert any(c["activation"]["bits"] == 16 for r in res.plan.to_json()["ranges"] for c in r.get("candidates", []))


def test_a16_lowering_runs_and_stays_close_to_float():
    """The a16 variant (int8 weights behind 16-bit activations) loads in onnxruntime and its outputs
    are within the int8 weight error of float, far below an 8-bit-activation model's error."""
    import dataclasses

    import onnxruntime as ort

    from laqonnx.quant.lower import LoweringSpec, lower, quantized_tensors
    from laqonnx.quant.numerics import weight_qparams

    model = models.mlp(seed=3, dims=(16, 32, 5))
    x = models.random_input(model, n=64, seed=2)
    pm = load_model(model, allow_quantized=False)
    weights = {lay.weight: weight_qparams(pm.weight(lay), WeightQuant(8, PerChannel(lay.channel_axis))) for lay in pm.layers}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = model.graph.input[0].name
    y = ref.run(None, {name: x})[0]
    tensors = quantized_tensors(model)
    # no clipping (ReLU outputs start at 0: the quantizer folds the ReLU into their QDQ): the error is the quantum
    ranges = {t: (0.0, 64.0) if t.startswith("r") else (-64.0, 64.0) for t in tensors}
    outs = {}
    for bits in (8, 16):
        acts = {} if bits == 8 else {t: dataclasses.replace(ActivationQuant(), bits=16) for t in tensors}
        q = lower(model, LoweringSpec(weights=weights, ranges=ranges, activations=acts))
        assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
        outs[bits] = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    err8, err16 = (float(np.abs(outs[b] - y).max()) for b in (8, 16))
    assert err16 < err8 / 4


def test_output_producers_follow_removable_activations():
    from laqonnx.quant.structure import output_producers

    pm = load_model(models.mlp(seed=0, dims=(16, 12, 10, 8, 5)), allow_quantized=False)
    assert output_producers(pm) == {"r0": ("fc0",), "r1": ("fc1",), "r2": ("fc2",), "logits": ("fc3",)}
    pm = load_model(models.cnn(seed=0, hw=6), allow_quantized=False)  # Conv -> Relu -> Flatten -> Gemm
    assert output_producers(pm) == {"r1": ("conv1",), "r2": ("conv2",), "logits": ("fc",)}


def test_a16_after_an_int8_layer_unfuses_it_and_the_estimate_charges_it():
    """onnxruntime itself: an int8 Gemm whose output QuantizeLinear is 16-bit is not fused (its weight
    is dequantized at run time), while with 8-bit activations everywhere every Gemm is; the plan
    estimate charges exactly the int8 layers before a 16-bit activation (not float ones)."""
    import onnxruntime as ort

    from laqonnx.quant.costs import unfused_layers
    from laqonnx.quant.lower import LoweringSpec, lower, quantized_tensors
    from laqonnx.quant.numerics import weight_qparams

    model = models.mlp(seed=3, dims=(16, 32, 32, 5))
    pm = load_model(model, allow_quantized=False)
    w8 = {lay.name: WeightQuant(8, PerChannel(lay.channel_axis)) for lay in pm.layers}
    weights = {lay.weight: weight_qparams(pm.weight(lay), w8[lay.name]) for lay in pm.layers}
    tensors = quantized_tensors(model)
    ranges = {t: (0.0, 8.0) if t.startswith("r") else (-8.0, 8.0) for t in tensors}

    def fused_ops(acts):
        q = lower(model, LoweringSpec(weights=weights, ranges=ranges, activations=acts))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp / "opt.onnx")
        ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
        import onnx

        return [n.op_type for n in onnx.load(str(tmp / "opt.onnx")).graph.node if n.op_type in ("Gemm", "QGemm")]

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        assert fused_ops({}) == ["QGemm"] * 3
        got = fused_ops({"r1": A16})  # fc2's input 16-bit: fc2 (a16) and fc1 (its output Q) unfused, fc0 fused
        assert got == ["QGemm", "Gemm", "Gemm"], got
    acts = {"fc0": None, "fc1": None, "fc2": A16}
    assert unfused_layers(pm, {}, w8, acts) == ["fc1"]
    assert unfused_layers(pm, {}, {**w8, "fc1": None}, acts) == []  # a float fc1 is not charged again
    table = LatencyTable({n: {"float": 1.0, "int8": 0.25, "int4": 0.5, "a16": 0.75} for n in w8}, rest_ms=0.0, float_ms=3.0)
    assert table.total_ms(w8, acts, unfused_layers(pm, {}, w8, acts)) == pytest.approx(0.25 + 0.25 + 0.75 + 0.5)


def test_int4_a_latency_budget_cannot_prefer_is_not_scored_nor_rounded(monkeypatch):
    """Under a latency budget int4 is dropped where the table measures it no faster than int8 (and on
    every Conv): those layers get no 4-bit settings and no adaptive rounding is fitted for them; the
    others keep theirs, adaptive copy included."""
    import laqonnx.quant.rounding as rounding
    from laqonnx.quant.collect import collect
    from laqonnx.quant.lower import quantized_tensors
    from laqonnx.quant.metric import CandidateSpace, ObjectiveConfig
    from laqonnx.quant.latency_costs import int4_dominated as _latency_dominated
    from laqonnx.quant.scoring import CalibSet, score_layers

    pm = load_model(models.mlp(seed=1, dims=(16, 24, 24, 5)), allow_quantized=False)
    table = LatencyTable({"fc0": {"float": 1.0, "int8": 0.3, "int4": 0.2}, "fc1": {"float": 1.0, "int8": 0.3, "int4": 0.3},
                          "fc2": {"float": 1.0, "int8": 0.3, "int4": 0.5}}, rest_ms=0.0, float_ms=3.0)
    drop = _latency_dominated(pm, table)
    assert drop == {("fc1", 4), ("fc2", 4)}
    cnn = load_model(models.cnn(seed=0, hw=6), allow_quantized=False)
    fast4 = LatencyTable({lay.name: {"float": 1.0, "int8": 0.5, "int4": 0.1} for lay in cnn.layers}, 0.0, 3.0)
    assert _latency_dominated(cnn, fast4) == {(lay.name, 4) for lay in cnn.layers if lay.op_type == "Conv"}

    fitted = []
    real = rounding.adaptive_round
    monkeypatch.setattr(rounding, "adaptive_round", lambda layer, *a, **k: fitted.append(layer.name) or real(layer, *a, **k))
    x = models.random_input(pm.model, n=16, seed=5)
    stats = collect(pm.model, quantized_tensors(pm.model), [x], progress=False)
    space = CandidateSpace(weight_methods=("maxabs", "mse"), activation_methods=("minmax",))
    scored = score_layers(pm, stats, ObjectiveConfig(eps=0.0), space, CalibSet(x), weight_bits=(8, 4), progress=False,
                          drop=drop)
    assert fitted == ["fc0"]
    bits = {lt.layer.name: {s.setting.bits for s in lt.scores} for lt in scored.layers}
    assert bits == {"fc0": {8, 4}, "fc1": {8}, "fc2": {8}}
    assert any(s.setting.rounding == "adaptive" for s in scored.layers[0].scores)
