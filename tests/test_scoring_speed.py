"""The batched scoring path gives the metric's terms as its definition does: all projections and examples of
a chunk in one vmapped backward pass against one plain backward pass per example and projection (a guard
for any speed-up of laqonnx.quant.sensitivity)."""

from __future__ import annotations

import numpy as np
import pytest

from laqonnx.graph import load_model
from laqonnx.quant import sensitivity
from laqonnx.quant.sensitivity import SensitivityConfig, logits_mirror, mirror_sensitivities, projection_rows
from tests import models

torch = pytest.importorskip("torch")

BUILDERS = {
    "mlp": lambda: models.mlp(seed=3),
    "residual": lambda: models.residual(seed=1, ch=3, hw=5),
    "concat": lambda: models.concat(seed=2, hw=4),
    "cnn_bn_20_classes": lambda: models.cnn(seed=4, hw=8, classes=20, bn=True),
}


def _problem(name: str, n: int = 5):
    pm = load_model(BUILDERS[name]())
    rng = np.random.default_rng(7)
    x = models.random_input(pm.model, n=n, seed=5)
    xa = np.clip(x + rng.uniform(-0.05, 0.05, x.shape), 0, 1).astype(np.float32)
    deltas = {layer.name: rng.normal(0, 0.01, (3, *layer.weight_shape)).astype(np.float32) for layer in pm.layers}
    params = {}
    for layer in pm.layers:
        params[layer.input] = np.array([[0.01, 128, 0, 255], [0.03, 100, 0, 255], [0.002, 0, -128, 127]], np.float64)
    return pm, x, xa, deltas, params


def _reference(pm, mirror, x, xa, deltas, params, config):
    """The definition, one example and one projection at a time, each with its own backward pass."""
    layers = pm.layers
    keep = set(params) | {layer.output for layer in layers} | {layer.input for layer in layers}
    with torch.no_grad():
        probe, _ = sensitivity._forward(torch, mirror, torch.from_numpy(x[:1]), set())
    rows, _ = projection_rows(int(probe.reshape(1, -1).shape[1]), len(x), config)
    fns = {layer.name: sensitivity._linear_part(torch, layer) for layer in layers}

    def terms(xi, u):
        out, kept = sensitivity._forward(torch, mirror, torch.from_numpy(xi[None]), keep)
        out = out.reshape(1, -1)
        per = {}
        for k in range(u.shape[0]):
            names = list(kept)
            grads = torch.autograd.grad(out, [kept[t] for t in names], grad_outputs=u[k][None], retain_graph=True,
                                        allow_unused=True)
            g = {t: (gr if gr is not None else torch.zeros_like(kept[t])) for t, gr in zip(names, grads)}
            with torch.no_grad():
                for layer in layers:
                    a = kept[layer.input].detach()
                    for s, dw in enumerate(deltas[layer.name]):
                        d = fns[layer.name](a, torch.from_numpy(dw))
                        per[("w", layer.name, s, k)] = float((d.double() * g[layer.output].double()).sum())
                for t, q in params.items():
                    v = kept[t].detach().double()
                    for s, (scale, zp, lo, hi) in enumerate(q):
                        e = (torch.clamp(torch.round(v / scale) + zp, lo, hi) - zp) * scale - v
                        per[("a", t, s, k)] = float((e * g[t].double()).sum())
        return per

    clean = [terms(xi, u) for xi, u in zip(x, rows)]
    adv = [terms(xi, u) for xi, u in zip(xa, rows)]
    wc, wa, ac, aa = {}, {}, {}, {}
    for key in clean[0]:
        kind, name, s, _ = key
        c = sum(p[key] ** 2 for p in clean) / len(x)
        v = sum((q[key] - p[key]) ** 2 for p, q in zip(clean, adv)) / len(x)
        (wc if kind == "w" else ac).setdefault(name, {}).setdefault(s, 0.0)
        (wa if kind == "w" else aa).setdefault(name, {}).setdefault(s, 0.0)
        (wc if kind == "w" else ac)[name][s] += c
        (wa if kind == "w" else aa)[name][s] += v
    table = lambda d: {name: np.array([v[s] for s in sorted(v)]) for name, v in d.items()}  # noqa: E731
    return table(wc), table(wa), table(ac), table(aa)


def _assert_same(got, want, rtol):
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("projections,weight_gradients", [(None, None), (3, False), (2, None), (None, True)])
def test_batched_terms_equal_one_backward_per_projection(name, projections, weight_gradients):
    """Both ways of measuring a weight candidate (applying it; contracting it with the per-example
    weight gradient, chosen when a layer has more candidates than projections) give the definition."""
    pm, x, xa, deltas, params = _problem(name)
    mirror = logits_mirror(pm)
    config = SensitivityConfig(projections=projections, seed=1, weight_gradients=weight_gradients)
    sens = mirror_sensitivities(mirror, pm.layers, deltas, params, x, xa, config)
    wc, wa, ac, aa = _reference(pm, mirror, x, xa, deltas, params, config)
    _assert_same(sens.weight_clean, wc, 1e-4)
    _assert_same(sens.weight_adversarial, wa, 1e-4)
    _assert_same(sens.activation_clean, ac, 1e-4)
    _assert_same(sens.activation_adversarial, aa, 1e-4)


def _linear_cases():
    from types import SimpleNamespace

    from tests.test_lipschitz import CONV_CASES, _single

    for case, (op, in_shape, w_shape, attrs) in CONV_CASES.items():
        if case.startswith("lanczos"):
            continue
        pm = load_model(_single(op, in_shape, np.random.default_rng(len(case)).normal(0, 0.5, w_shape), **attrs))
        (layer,) = pm.layers
        yield case, layer, (3, *in_shape)
    for case, attrs, in_shape, w_shape in [
        ("gemm-transB-alpha", dict(transB=1, alpha=0.5), (3, 6), (4, 6)),
        ("gemm", {}, (3, 6), (6, 4)),
        ("matmul-3d", dict(weight_input=1), (3, 5, 6), (6, 4)),
        ("matmul-weight-left", dict(weight_input=0), (3, 6, 5), (4, 6)),
    ]:
        yield case, SimpleNamespace(op_type="Gemm" if case.startswith("gemm") else "MatMul", attrs=attrs,
                                    weight_shape=w_shape), in_shape


@pytest.mark.parametrize("case,layer,in_shape", list(_linear_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_weight_gradient_contraction_equals_applying_each_candidate(case, layer, in_shape):
    """<dW_s, G_kb> (per-example weight gradients, in groups small enough for the memory bound) equals
    g_kb . T[dW_s](a_b) for every candidate, projection and example: Conv/ConvTranspose with strides,
    groups, asymmetric pads, output padding, dilation and 1-D/3-D kernels; Gemm with transB/alpha; MatMul
    with the weight on either side."""
    rng = np.random.default_rng(3)
    fn = sensitivity._linear_part(torch, layer)
    a = torch.from_numpy(rng.normal(0, 1, in_shape).astype(np.float32))
    dw = torch.from_numpy(rng.normal(0, 1, (4, *layer.weight_shape)).astype(np.float32))
    out = fn(a, dw[0])
    g = torch.from_numpy(rng.normal(0, 1, (2, *out.shape)).astype(np.float32))
    want = torch.einsum("sbn,kbn->skb", torch.stack([fn(a, d) for d in dw]).flatten(2), g.flatten(2))
    direct = sensitivity._conv_weight_gradient(torch, layer)
    assert (direct is not None) == (layer.op_type == "Conv")
    for memory in (1 << 30, 1):  # one group of examples; one example per group
        for how in (None, direct):  # autograd through the layer; a Conv's weight gradient without its forward
            got = sensitivity._by_weight_gradient(torch, fn, a, g, dw, memory, how)
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
