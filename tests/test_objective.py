"""Consistency: the per-layer choice minimises the linearised whole-network bound (brute force).

The whole-network bound is computed here independently of ``laqonnx.quant.metric``'s per-layer metric:
``B(s) = eps2 * (Lambda + sum_l dLambda/dL_l * (Lhat_l(s) - L_l)) + sum_l G_l * q_l(s)`` with
``dLambda/dL_l`` a finite difference of :func:`network_bounds` (a network-level quantity), ``G_l``
from the same, and ``q_l`` rebuilt from operator norms of the quantized weights and the calibration
histograms. The brute force runs over every combination of the layers' candidates.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import onnx
import pytest

from laqonnx.quant.collect import collect
from laqonnx.quant.ranges import activation_error, activation_norm, activation_range
from laqonnx.graph import load_model
from laqonnx.lipschitz import network_bounds, operator_norm
from laqonnx.quant.lower import quantized_tensors
from laqonnx.quant.metric import CandidateSpace, ObjectiveConfig, eps_l2, score_layers
from laqonnx.quant.costs import choose
from laqonnx.quant.numerics import PerChannel, PerTensor, quantize_weight
from tests import models

SPACE = CandidateSpace(
    weight_bits=(8, 4),
    granularities=(PerTensor(), PerChannel()),
    weight_methods=("maxabs", "mse"),
    activation_methods=("minmax", "percentile"),
    activation_percentile=99.0,
)
BUILDERS = {
    "mlp": lambda: models.mlp(seed=3),
    "residual": lambda: models.residual(seed=1, ch=3, hw=5),
    "concat": lambda: models.concat(seed=2, hw=4),
}


@functools.lru_cache(maxsize=None)
def _prepared(name: str):
    pm = load_model(BUILDERS[name]())
    x = models.random_input(pm.model, n=16, seed=5)
    stats = collect(pm.model, quantized_tensors(pm.model), [x[:8], x[8:]], progress=False)
    return pm, stats


def _setup(name: str, objective: str, eps: float = 0.05):
    pm, stats = _prepared(name)
    config = ObjectiveConfig(objective=objective, eps=eps, norm="inf", tol=1e-6, max_iter=2000)
    return pm, stats, config


@functools.lru_cache(maxsize=None)
def _terms_cached(name: str, bits: tuple[int, ...]):
    pm, stats = _prepared(name)
    return _independent_terms(pm, stats, None, bits)


def _independent_terms(pm, stats, config, bits):
    """Per layer: L, derivative, gain, and per candidate (Lhat, q) computed from primitives."""
    norms = {l.name: operator_norm(l, pm.weight(l), tol=1e-6, max_iter=2000).value for l in pm.layers}
    base = network_bounds(pm, norms)
    lam = base.network_bound
    deriv = {}
    for l in pm.layers:
        h = 1e-3 * norms[l.name]
        hi = network_bounds(pm, {**norms, l.name: norms[l.name] + h}).network_bound
        lo = network_bounds(pm, {**norms, l.name: norms[l.name] - h}).network_bound
        deriv[l.name] = (hi - lo) / (2 * h)
    terms = {}
    for l in pm.layers:
        w = pm.weight(l)
        st = stats[l.input]
        anorm = activation_norm(st)
        per = {}
        for ws in SPACE.weight_settings(l.channel_axis, bits):
            wq, _ = quantize_weight(w, ws)
            lhat = operator_norm(l, wq, tol=1e-6, max_iter=2000).value
            dn = operator_norm(l, w - wq, tol=1e-6, max_iter=2000).value
            for a in SPACE.activation_settings():
                e = activation_error(st, *activation_range(st, a), a)
                per[(ws, a)] = (lhat, base.gains[l.name] * (dn * anorm + lhat * e))
        terms[l.name] = per
    return norms, lam, deriv, terms


def _bound(objective, e2, norms, lam, deriv, combo):
    """combo: {layer: (Lhat, q)} -> the linearised whole-network objective."""
    adv = e2 * (lam + sum(deriv[n] * (lhat - norms[n]) for n, (lhat, _) in combo.items()))
    quant = sum(q for _, q in combo.values())
    return {"laq": adv + quant, "mse": quant, "lipschitz": adv}[objective]


def _brute(pm, terms, objective, e2, norms, lam, deriv, budget_bits=None):
    names = [l.name for l in pm.layers]
    inputs = {l.name: l.input for l in pm.layers}
    params = {l.name: int(np.prod(l.weight_shape)) for l in pm.layers}
    best = math.inf
    for choice in itertools.product(*[list(terms[n]) for n in names]):
        acts = {}
        if any(acts.setdefault(inputs[n], c[1]) != c[1] for n, c in zip(names, choice)):
            continue  # layers reading one tensor share its activation QDQ
        if budget_bits is not None and sum(params[n] * c[0].bits for n, c in zip(names, choice)) > budget_bits:
            continue
        combo = {n: terms[n][c] for n, c in zip(names, choice)}
        best = min(best, _bound(objective, e2, norms, lam, deriv, combo))
    return best


def _selected_value(pm, scored, chosen, terms, objective, e2, norms, lam, deriv):
    combo = {}
    for lt in scored.layers:
        c = lt.scores[chosen[lt.layer.name]].candidate
        combo[lt.layer.name] = terms[lt.layer.name][(c.weight, c.activation)]
    return _bound(objective, e2, norms, lam, deriv, combo)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("objective", ["laq", "mse", "lipschitz"])
def test_per_layer_choice_minimises_whole_network_bound(name, objective):
    pm, stats, config = _setup(name, objective)
    scored = score_layers(pm, stats, config, SPACE, weight_bits=(8,), progress=False)
    chosen = choose(scored, pm, None, None)
    norms, lam, deriv, terms = _terms_cached(name, (8,))
    e2 = eps_l2(config, pm.input_shape)
    assert scored.network_bound == pytest.approx(lam, rel=1e-6)
    for lt in scored.layers:  # dLambda/dL_l is the network-level derivative (not Lambda/L_l off a chain)
        assert lt.derivative == pytest.approx(deriv[lt.layer.name], rel=1e-5)
    best = _brute(pm, terms, objective, e2, norms, lam, deriv)
    got = _selected_value(pm, scored, chosen, terms, objective, e2, norms, lam, deriv)
    assert got == pytest.approx(best, rel=1e-6, abs=1e-9)
    # the chosen settings are int8
    assert all(lt.scores[chosen[lt.layer.name]].candidate.weight.bits == 8 for lt in scored.layers)


@pytest.mark.parametrize("name", ["mlp", "residual"])
@pytest.mark.parametrize("avg_bits", [4.5, 6.0, 7.5])
def test_budgeted_choice_equals_brute_force(name, avg_bits):
    pm, stats, config = _setup(name, "laq")
    scored = score_layers(pm, stats, config, SPACE, weight_bits=(8, 4), progress=False)
    chosen = choose(scored, pm, avg_bits, None)
    norms, lam, deriv, terms = _terms_cached(name, (8, 4))
    e2 = eps_l2(config, pm.input_shape)
    total = sum(int(np.prod(l.weight_shape)) for l in pm.layers)
    budget = math.floor(avg_bits * total)
    used = sum(int(np.prod(lt.layer.weight_shape)) * lt.scores[chosen[lt.layer.name]].candidate.weight_bits for lt in scored.layers)
    assert used <= budget
    best = _brute(pm, terms, "laq", e2, norms, lam, deriv, budget_bits=budget)
    got = _selected_value(pm, scored, chosen, terms, "laq", e2, norms, lam, deriv)
    assert got == pytest.approx(best, rel=1e-6, abs=1e-9)


def test_chain_derivative_is_lambda_over_L():
    """On a chain, dLambda/dL_l = Lambda / L_l: the adversarial term is eps*Lambda*(Lhat/L - 1)."""
    pm, stats, config = _setup("mlp", "laq")
    scored = score_layers(pm, stats, config, SPACE, weight_bits=(8,), progress=False)
    for lt in scored.layers:
        assert lt.derivative == pytest.approx(scored.network_bound / lt.operator_norm, rel=1e-9)
        for s in lt.scores:
            expected = scored.eps_l2 * scored.network_bound * (s.lhat / lt.operator_norm - 1)
            assert s.adversarial == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_eps_conversion():
    assert eps_l2(ObjectiveConfig(eps=0.1, norm="inf"), (1, 3, 4, 4)) == pytest.approx(0.1 * math.sqrt(48))
    assert eps_l2(ObjectiveConfig(eps=0.1, norm="2"), (1, 3, 4, 4)) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs",
    [dict(objective="bogus"), dict(norm="1"), dict(eps=-1.0), dict(norm_max_spatial=0), dict(tol=0.0),
     dict(error_tol=0.0), dict(error_tol=1.0)],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        ObjectiveConfig(**kwargs)


def test_candidate_space_validation():
    with pytest.raises(ValueError):
        CandidateSpace(weight_bits=(3,))
    with pytest.raises(ValueError):
        CandidateSpace(activation_methods=())
    space = CandidateSpace(allow_float=True)
    assert None in space.weight_settings(0, (8, 32)) and None not in space.weight_settings(0, (8,))
    assert len(space.weight_settings(0, (8,))) == 6 and len(space.activation_settings()) == 4


@pytest.mark.parametrize("tol, error_tol, expected", [(1e-3, None, 1e-2), (1e-6, None, 1e-5), (1e-3, 0.05, 0.05)])
def test_error_norm_tolerance(tol, error_tol, expected):
    assert ObjectiveConfig(tol=tol, error_tol=error_tol).error_norm_tol == pytest.approx(expected)


def test_quantized_norm_one_step_tracks_converged_lanczos_better_than_lanczos_at_tol():
    """On a Lanczos-sized conv, int8 ``Lhat - L`` from one application on the float top vector is
    within 5e-5 * L of the converged difference (tol 1e-9); int4 (a large perturbation) runs
    Lanczos; first_order_max=0 always runs Lanczos."""
    from laqonnx.lipschitz import image_norm
    from laqonnx.quant.metric import _quantized_norm

    r = np.random.default_rng(4)
    w = r.normal(0, 0.2, (16, 16, 3, 3))
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["input", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 16, 24, 24])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16, 24, 24])],
        [onnx.numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    pm = load_model(model)
    (layer,) = pm.layers
    wf = pm.weight(layer)
    opts = {"tol": 1e-3, "max_iter": 300, "seed": 0}
    base = operator_norm(layer, wf, **opts)
    assert base.method == "lanczos"
    gain = image_norm(layer, wf, base.vector)  # ||T[W] v||, as score_layers passes it
    exact = operator_norm(layer, wf, tol=1e-9, max_iter=3000)
    worst_one_step = worst_lanczos = 0.0
    for bits, one_step in ((8, True), (4, False)):
        for ws in CandidateSpace(weight_bits=(bits,)).weight_settings(layer.channel_axis):
            wq, _ = quantize_weight(wf, ws)
            dn = operator_norm(layer, wf - wq, tol=1e-2, max_iter=300).value
            assert (dn <= 0.02 * base.value) is one_step
            got = _quantized_norm(layer, base, gain, wq, dn, 0.02, opts)
            if one_step:
                truth = operator_norm(layer, wq, tol=1e-9, max_iter=3000, init=exact.vector).value - exact.value
                assert abs((got - base.value) - truth) <= 5e-5 * exact.value
                worst_one_step = max(worst_one_step, abs((got - base.value) - truth))
                lanczos = operator_norm(layer, wq, init=base.vector, **opts).value
                worst_lanczos = max(worst_lanczos, abs((lanczos - base.value) - truth))
                assert abs(got - base.value) <= dn  # Weyl
            else:
                assert got == operator_norm(layer, wq, init=base.vector, **opts).value
            assert _quantized_norm(layer, base, gain, wq, dn, 0.0, opts) == operator_norm(layer, wq, init=base.vector, **opts).value
    assert worst_one_step < worst_lanczos  # Lanczos re-converged to tol is the noisier estimate of the change


def test_settings_share_norms_exactly_when_they_give_the_same_weights(monkeypatch):
    """The sharing key: equal for per-tensor and an all-equal per-channel setting (same fake-quant
    weights), different as soon as one channel's scale differs; and in scoring, settings with the
    same effective qparams get the same norms, computed once."""
    from laqonnx.quant.metric import _effective_qparams
    from laqonnx.quant.numerics import QParams, WeightQuant, fake_quant

    w = np.random.default_rng(0).normal(0, 1, (4, 3, 3, 3)).astype(np.float32)
    w[1:] = w[0]  # every channel the same: per-channel max-abs scales are all equal
    _, pt = quantize_weight(w, WeightQuant(8, PerTensor(), "maxabs"))
    _, pc = quantize_weight(w, WeightQuant(8, PerChannel(0), "maxabs"))
    assert np.array_equal(fake_quant(w, pt), fake_quant(w, pc))
    assert _effective_qparams(pt, w.shape, 0) == _effective_qparams(pc, w.shape, 0)
    other = QParams(scale=pc.scale * np.array([1, 1, 1, 1.01], np.float32), zero_point=pc.zero_point, bits=8, signed=True, axis=0)
    assert not np.array_equal(fake_quant(w, other), fake_quant(w, pc))
    assert _effective_qparams(other, w.shape, 0) != _effective_qparams(pc, w.shape, 0)
    _, p4 = quantize_weight(w, WeightQuant(4, PerTensor(), "maxabs"))
    assert _effective_qparams(p4, w.shape, 0) != _effective_qparams(pt, w.shape, 0)

    # in scoring: per-channel max-abs and percentile 100 give the same scales, so the same norms,
    # computed once (operator_norm is called for the error norm of each distinct weight only)
    import laqonnx.lipschitz as lip

    pm, stats = _prepared("mlp")
    space = CandidateSpace(weight_bits=(8,), granularities=(PerChannel(),), weight_methods=("maxabs", "percentile"),
                           weight_percentile=100.0, activation_methods=("minmax",))
    calls = []
    real = lip.operator_norm

    def spy(layer, weight, **kw):
        calls.append(layer.name)
        return real(layer, weight, **kw)

    monkeypatch.setattr(lip, "operator_norm", spy)
    scored = score_layers(pm, stats, ObjectiveConfig(), space, progress=False)
    for lt in scored.layers:
        a, b = lt.scores
        assert (a.lhat, a.weight_error_norm) == (b.lhat, b.weight_error_norm)
        assert calls.count(lt.layer.name) == 3  # the float norm, one error norm, one quantized norm
