"""The metric (version 2): its terms against exact answers, the choice against brute force, the
prediction against measured losses through onnxruntime, the guard, and the adversarial examples."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from laqonnx.errors import OptionError
from laqonnx.graph import load_model
from laqonnx.latency import cpu_info
from laqonnx.quant.collect import collect
from laqonnx.quant.costs import AvgBits, choose
from laqonnx.quant.guard import calibration_loss, logits_view
from laqonnx.quant.lower import quantized_tensors
from laqonnx.quant.metric import CandidateSpace, ObjectiveConfig, combine
from laqonnx.quant.numerics import PerChannel, PerTensor, activation_qparams, fake_quant, quantize_weight
from laqonnx.quant.planning import QuantizeOptions, build_plan, plan_model
from laqonnx.quant.ranges import activation_range
from laqonnx.quant.scoring import CalibSet, score_layers
from tests import models

torch = pytest.importorskip("torch")

# 7-bit int8 weights where this CPU's int8 kernels saturate full-range ones (x86 without VNNI): the
# measured losses through onnxruntime are then what the fake-quant terms predict
SPACE = CandidateSpace(weight_bits=(8, 4), granularities=(PerTensor(), PerChannel()), weight_methods=("maxabs", "mse"),
                       activation_methods=("minmax", "percentile"), activation_percentile=99.0, rounding="nearest",
                       reduce_range=cpu_info().int8_saturates())


def _linear(seed: int = 0, dims=(6, 5, 4)) -> onnx.ModelProto:
    """Gemm -> Gemm with no nonlinearity: the logits are linear in every error, so the metric's
    linearisation is exact."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "input"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        inits += [numpy_helper.from_array(rng.normal(0, 1, (b, a)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, b).astype(np.float32), f"b{i}")]
        out = "logits" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out], name=f"fc{i}", transB=1))
        x = out
    graph = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", dims[0]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", dims[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0].astype(np.float64)


def _centred_sq(d: np.ndarray) -> np.ndarray:
    d = d - d.mean(axis=1, keepdims=True)
    return (d ** 2).sum(axis=1)


def _with_weight(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return out


def _inject(model: onnx.ModelProto, tensor: str, error: np.ndarray) -> onnx.ModelProto:
    """``model`` with ``error`` added to ``tensor`` (fed as a second input)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    at = 0
    for i, node in enumerate(out.graph.node):
        node.input[:] = [f"{tensor}_plus" if n == tensor else n for n in node.input]
        if tensor in node.output:
            at = i + 1
    out.graph.node.insert(at, helper.make_node("Add", [tensor, "err"], [f"{tensor}_plus"]))
    out.graph.input.append(helper.make_tensor_value_info("err", TensorProto.FLOAT, list(error.shape)))
    onnx.checker.check_model(out)
    return out


def test_terms_are_exact_on_a_linear_network():
    """Every weight and activation term equals the centred logit change measured on onnxruntime
    with that one error applied (clean mean, and the paired difference at the adversarial points)."""
    model = _linear()
    pm = load_model(model)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (12, 6)).astype(np.float32)
    xa = np.clip(x + rng.uniform(-0.1, 0.1, x.shape), 0, 1).astype(np.float32)
    stats = collect(pm.model, quantized_tensors(pm.model), [x, xa], progress=False)
    scored = score_layers(pm, stats, ObjectiveConfig(eps=0.1, metric_examples=12), SPACE, CalibSet(x, xa),
                          weight_bits=(8, 4), progress=False)
    f, fa = _ort(model, x), _ort(model, xa)
    for lt in scored.layers:
        w = pm.weight(lt.layer)
        for s in lt.scores:
            wq, _ = quantize_weight(w, s.setting)
            q = _with_weight(model, lt.layer.weight, wq)
            dc, da = _ort(q, x) - f, _ort(q, xa) - fa
            assert s.clean == pytest.approx(_centred_sq(dc).mean(), rel=1e-4, abs=1e-9)
            assert s.adversarial == pytest.approx(_centred_sq(da - dc).mean(), rel=1e-4, abs=1e-9)
            assert s.metric == pytest.approx(s.clean + s.adversarial)
    hidden = _ort(logits_view(model, "h0"), x), _ort(logits_view(model, "h0"), xa)
    for a in scored.tensors["h0"]:
        lo, hi = activation_range(stats["h0"], a.setting)
        qp = activation_qparams(lo, hi, a.setting)
        ec, ea = (np.float32(fake_quant(h.astype(np.float32), qp) - h) for h in hidden)
        s = ort.InferenceSession(_inject(model, "h0", ec).SerializeToString(), providers=["CPUExecutionProvider"])
        dc = s.run(None, {"input": x, "err": ec})[0] - f
        da = s.run(None, {"input": xa, "err": ea})[0] - fa
        assert a.clean == pytest.approx(_centred_sq(dc).mean(), rel=1e-4, abs=1e-9)
        assert a.adversarial == pytest.approx(_centred_sq(da - dc).mean(), rel=1e-4, abs=1e-9)


def test_random_projections_are_unbiased():
    """With fewer projections than classes the terms are estimates whose mean over seeds is the exact value."""
    from laqonnx.quant.sensitivity import SensitivityConfig, logits_mirror, mirror_sensitivities

    model = _linear(seed=2, dims=(6, 5, 12))
    pm = load_model(model)
    x = np.random.default_rng(0).uniform(0, 1, (16, 6)).astype(np.float32)
    layer = pm.layers[0]
    dw = np.random.default_rng(1).normal(0, 0.01, (1, *layer.weight_shape)).astype(np.float32)
    mirror = logits_mirror(pm)
    exact = mirror_sensitivities(mirror, [layer], {layer.name: dw}, {}, x, None, SensitivityConfig())
    assert exact.exact and exact.projections == 12
    est = [mirror_sensitivities(mirror, [layer], {layer.name: dw}, {}, x, None, SensitivityConfig(projections=3, seed=s))
           .weight_clean[layer.name][0] for s in range(60)]
    assert np.mean(est) == pytest.approx(exact.weight_clean[layer.name][0], rel=0.1)
    assert np.std(est) > 0  # they are estimates


def test_without_torch_the_terms_are_each_layers_output_error():
    """The onnxruntime fallback: E ||T[dW] a||^2 per weight setting, sum over readers of E ||T e||^2."""
    from laqonnx.quant.layer_error import layer_errors

    model = _linear(seed=3)
    pm = load_model(model)
    x = np.random.default_rng(2).uniform(0, 1, (10, 6)).astype(np.float32)
    w0 = pm.weight(pm.layers[0])
    dw = np.random.default_rng(3).normal(0, 0.01, (2, *w0.shape)).astype(np.float32)
    rows = np.array([[0.02, 128, 0, 255]], dtype=np.float64)
    got = layer_errors(pm, {"fc0": dw, "fc1": np.zeros((0, 4, 5), np.float32)}, {"input": rows}, x)
    expected = [((x @ d.T) ** 2).sum(1).mean() for d in dw]
    np.testing.assert_allclose(got.weight_clean["fc0"], expected, rtol=1e-5)
    e = np.clip(np.rint(x / 0.02) + 128, 0, 255)
    e = (e - 128) * np.float32(0.02) - x
    np.testing.assert_allclose(got.activation_clean["input"], [((e @ w0.T) ** 2).sum(1).mean()], rtol=1e-4)


BUILDERS = {"mlp": lambda: models.mlp(seed=3), "residual": lambda: models.residual(seed=1, ch=3, hw=5),
            "concat": lambda: models.concat(seed=2, hw=4)}


@functools.lru_cache(maxsize=None)
def _scored(name: str, bits: tuple[int, ...]):
    pm = load_model(BUILDERS[name]())
    x = models.random_input(pm.model, n=16, seed=5)
    xa = np.clip(x + np.random.default_rng(6).uniform(-0.05, 0.05, x.shape), 0, 1).astype(np.float32)
    stats = collect(pm.model, quantized_tensors(pm.model), [x, xa], progress=False)
    scored = score_layers(pm, stats, ObjectiveConfig(eps=0.05), SPACE, CalibSet(x, xa), weight_bits=bits, progress=False)
    return pm, scored


def _brute(pm, scored, objective: str, budget_bits: int | None):
    config = ObjectiveConfig()
    names = [lt.layer.name for lt in scored.layers]
    tensors = list(scored.tensors)
    best = math.inf
    for acts in itertools.product(*[range(len(scored.tensors[t])) for t in tensors]):
        a_value = sum(config.value(scored.tensors[t][i].clean, scored.tensors[t][i].adversarial, objective)
                      for t, i in zip(tensors, acts))
        for ws in itertools.product(*[range(len(lt.scores)) for lt in scored.layers]):
            if budget_bits is not None and sum(lt.scores[k].cost_bits for lt, k in zip(scored.layers, ws)) > budget_bits:
                continue
            value = a_value + sum(config.value(lt.scores[k].clean, lt.scores[k].adversarial, objective)
                                  for lt, k in zip(scored.layers, ws))
            best = min(best, value)
    assert names
    return best


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("objective", ["laq", "mse", "lipschitz"])
def test_per_layer_choice_is_the_brute_force_minimum(name, objective):
    pm, scored = _scored(name, (8,))
    rescored = scored.rescored(ObjectiveConfig(), objective)
    choice = choose(rescored, pm)
    assert choice.value == pytest.approx(_brute(pm, scored, objective, None), rel=1e-9, abs=1e-15)
    assert all(lt.scores[choice.weights[lt.layer.name]].setting.bits == 8 for lt in scored.layers)


@pytest.mark.parametrize("name", ["mlp", "residual"])
@pytest.mark.parametrize("avg_bits", [4.5, 6.0, 7.5])
def test_budgeted_choice_equals_brute_force(name, avg_bits):
    pm, scored = _scored(name, (8, 4))
    total = sum(int(np.prod(lt.layer.weight_shape)) for lt in scored.layers)
    choice = choose(scored, pm, AvgBits(avg_bits))
    budget = math.floor(avg_bits * total)
    assert sum(lt.scores[choice.weights[lt.layer.name]].cost_bits for lt in scored.layers) <= budget
    assert choice.value == pytest.approx(_brute(pm, scored, "laq", budget), rel=1e-9)


def test_the_adversarial_term_is_zero_without_adversarial_examples():
    pm = load_model(models.mlp(seed=1))
    x = models.random_input(pm.model, n=8)
    stats = collect(pm.model, quantized_tensors(pm.model), [x], progress=False)
    scored = score_layers(pm, stats, ObjectiveConfig(), SPACE, CalibSet(x), weight_bits=(8,), progress=False)
    assert not scored.adversarial
    assert all(s.adversarial is None and s.metric == s.clean for lt in scored.layers for s in lt.scores)


def test_prediction_ranks_the_measured_losses_of_random_mixed_plans():
    """The consistency that matters: over random mixed int8/int4 plans of a trained CNN the predicted
    sum of terms ranks the loss measured on the written models through onnxruntime (Spearman >= 0.8)."""
    from scipy.stats import spearmanr

    from tests._digits_model import digits_cnn

    model = digits_cnn()[1]
    pm = load_model(model)
    planned = plan_model(pm, "digits", QuantizeOptions(eps=0.1, budget=AvgBits(6.0), calib_limit=128, guard=False,
                                                       candidates=SPACE, metric_examples=48), progress=False)
    cal, scored = planned.calibration, planned.scored
    data = cal.data.pairs(48)
    ref = (_ort(logits_view(pm.model, pm.output_name), data.clean), _ort(logits_view(pm.model, pm.output_name), data.adversarial))
    rng = np.random.default_rng(0)
    predicted, measured = [], []
    from laqonnx.quant.costs import Choice

    for _ in range(30):
        p4 = rng.uniform()
        weights = {lt.layer.name: int(rng.choice([k for k, s in enumerate(lt.scores) if (s.setting.bits == 4) == (rng.uniform() < p4)]
                                                 or range(len(lt.scores)))) for lt in scored.layers}
        acts = {t: int(rng.integers(len(v))) for t, v in scored.tensors.items()}
        _, q, _ = build_plan(pm, scored, cal, Choice(weights, acts, 0, 0.0), SPACE)
        got = (_ort(q, data.clean), _ort(q, data.adversarial))
        clean, adv = calibration_loss(ref, got)
        measured.append(clean + adv)
        predicted.append(sum(lt.scores[weights[lt.layer.name]].metric for lt in scored.layers)
                         + sum(scored.tensors[t][i].metric for t, i in acts.items()))
    rho = spearmanr(predicted, measured)[0]
    assert rho >= 0.8, rho


def test_guard_keeps_the_lowest_measured_plan():
    from tests._digits_model import digits_cnn

    model = digits_cnn()[1]
    pm = load_model(model)
    planned = plan_model(pm, "digits", QuantizeOptions(eps=0.1, budget=AvgBits(5.0), calib_limit=96, candidates=SPACE),
                         progress=False)
    g = planned.plan.guard
    assert g is not None and set(g.losses) >= {"laq", "mse", "lipschitz", "uniform"}
    assert g.kept == min(g.losses, key=g.losses.get)
    data = planned.calibration.data.pairs(64)
    ref = (_ort(logits_view(pm.model, pm.output_name), data.clean), _ort(logits_view(pm.model, pm.output_name), data.adversarial))
    got = (_ort(planned.lowered, data.clean), _ort(planned.lowered, data.adversarial))
    clean, adv = calibration_loss(ref, got)
    assert clean + adv == pytest.approx(g.losses[g.kept], rel=1e-6)
    off = plan_model(pm, "digits", QuantizeOptions(eps=0.1, budget=AvgBits(5.0), calib_limit=96, candidates=SPACE, guard=False),
                     progress=False)
    assert off.plan.guard is None


@pytest.mark.parametrize("norm,eps", [("inf", 0.1), ("2", 0.5)])
def test_generated_adversarial_examples_stay_in_the_threat_model_and_the_input_range(norm, eps):
    from laqonnx.quant.adversarial import Generated, pgd_examples
    from laqonnx.quant.sensitivity import logits_mirror
    from tests._digits_model import digits_cnn

    model = digits_cnn()[1]
    pm = load_model(model)
    from laqonnx.zoo.digits import load_digits

    x, _ = load_digits(8, "test")
    x = x[:32]
    mirror = logits_mirror(pm)
    xa = pgd_examples(mirror, x, eps, norm, (0.0, 1.0), Generated(steps=10))
    d = (xa - x).reshape(len(x), -1)
    size = np.abs(d).max(1) if norm == "inf" else np.linalg.norm(d, axis=1)
    assert size.max() <= eps * (1 + 1e-5) and xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        z, za = mirror(torch.from_numpy(x)), mirror(torch.from_numpy(xa))
    y = z.argmax(1)
    assert (za.argmax(1) == y).float().mean() < (z.argmax(1) == y).float().mean()  # the attack flips some
    # the steps run in smaller batches than the random starts are drawn in: every example's steps
    # depend on its own gradient only, so one example at a time gives the same examples
    xs = pgd_examples(mirror, x, eps, norm, (0.0, 1.0), Generated(steps=10), batch_size=64, step_batch=1)
    assert np.mean(np.isclose(xs, xa, atol=1e-6)) > 0.999
    assert not np.allclose(pgd_examples(mirror, x, eps, norm, (0.0, 1.0), Generated(steps=10, seed=1)), xa, atol=1e-3)


@pytest.mark.parametrize("kwargs", [dict(objective="bogus"), dict(norm="1"), dict(eps=-1.0), dict(adversarial_weight=-1),
                                    dict(metric_examples=0), dict(projections=0)])
def test_config_validation(kwargs):
    with pytest.raises(OptionError):
        ObjectiveConfig(**kwargs)


def test_combine_and_candidate_space():
    assert combine("laq", 1.0, 2.0, 0.5) == 2.0 and combine("mse", 1.0, 2.0) == 1.0 and combine("lipschitz", 1.0, 2.0) == 2.0
    assert combine("laq", 1.0, None) == 1.0
    with pytest.raises(ValueError):
        CandidateSpace(weight_bits=(3,))
    space = CandidateSpace(allow_float=True)
    assert None in space.weight_settings(0, (8, 32)) and None not in space.weight_settings(0, (8,))
    assert len(space.weight_settings(0, (8,))) == 6 and len(space.activation_settings()) == 4
