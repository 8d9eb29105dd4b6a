"""Adaptive rounding through a convolution's input Gram matrix: its error is the direct one, its
fit is never worse than nearest and about as good as the minibatch fit, and the cost rule keeps
small layers on the minibatch path."""

from __future__ import annotations

import numpy as np
import pytest

from laqonnx.graph.model import Layer
from laqonnx.quant.numerics import PerChannel, PerTensor, WeightQuant, quantize, weight_qparams
from laqonnx.quant.rounding import AdaRoundConfig, adaptive_round
from laqonnx.quant.rounding_gram import GRAM_MIN_MACS, build_gram, use_gram
from laqonnx.quant.sensitivity import _linear_part

torch = pytest.importorskip("torch")


def _conv(c_in, c_out, k=3, stride=1, pads=(1, 1, 1, 1), group=1, dil=1, size=9, n=12):
    layer = Layer(name="c", op_type="Conv", weight="w", weight_shape=(c_out, c_in // group, k, k), bias=None, input="x",
                  output="y", input_shape=(1, c_in, size, size), output_shape=None,
                  attrs={"kernel_shape": (k, k), "strides": (stride, stride), "dilations": (dil, dil), "pads": pads,
                         "group": group}, channel_axis=0, index=0)
    rng = np.random.default_rng(c_in * 7 + c_out)
    w = rng.normal(0, 0.3, layer.weight_shape).astype(np.float32)
    a = np.maximum(rng.normal(0.2, 1.0, (n, c_in, size, size)), 0).astype(np.float32)
    return layer, w, a


def _direct(layer, w_hat, w, a, b=None):
    """sum over examples, channels and positions of (conv(a, w_hat) - conv(b or a, w))^2 / N, float64."""
    F = torch.nn.functional
    at = torch.from_numpy(a).double()
    bt = at if b is None else torch.from_numpy(b).double()
    kw = dict(stride=layer.attrs["strides"], dilation=layer.attrs["dilations"], groups=layer.attrs["group"])
    p = layer.attrs["pads"]
    pad = [p[1], p[3], p[0], p[2]]
    y_hat = F.conv2d(F.pad(at, pad), torch.as_tensor(w_hat).double(), **kw)
    y = F.conv2d(F.pad(bt, pad), torch.as_tensor(w).double(), **kw)
    return float(((y_hat - y) ** 2).sum()) / len(a)


@pytest.mark.parametrize("geometry", [
    dict(c_in=4, c_out=6),
    dict(c_in=4, c_out=6, stride=2, pads=(0, 1, 2, 1)),  # asymmetric padding, stride
    dict(c_in=6, c_out=4, group=2, dil=2, pads=(2, 2, 2, 2)),  # groups and dilation
    dict(c_in=5, c_out=5, group=5),  # depthwise
])
@pytest.mark.parametrize("other_inputs", [False, True])
def test_gram_error_equals_the_direct_error(geometry, other_inputs):
    layer, w, a = _conv(**geometry)
    rng = np.random.default_rng(1)
    b = (a + rng.normal(0, 0.05, a.shape)).astype(np.float32) if other_inputs else None
    wt = torch.from_numpy(w)
    g = build_gram(torch, layer, torch.from_numpy(a), wt, None if b is None else torch.from_numpy(b))
    assert g.const == pytest.approx(_direct(layer, w, w, a, b) * len(a) if other_inputs else 0.0, rel=1e-5)
    for scale in (0.0, 0.01, 0.2):
        w_hat = (w + rng.normal(0, scale, w.shape)).astype(np.float32)
        ref = _direct(layer, w_hat, w, a, b)
        assert g.error(torch.from_numpy(w_hat), wt) == pytest.approx(ref, rel=1e-6, abs=1e-9)
        # and the layer map the minibatch path uses agrees on the geometry (ONNX pads order)
        fn = _linear_part(torch, layer)
        direct = fn(torch.from_numpy(a), torch.from_numpy(w_hat)) - fn(torch.from_numpy(a if b is None else b), wt)
        assert float((direct.double() ** 2).sum()) / len(a) == pytest.approx(ref, rel=1e-4, abs=1e-6)
    # the surrogate's gradient is the error's
    w_hat = torch.from_numpy((w + rng.normal(0, 0.1, w.shape)).astype(np.float32)).requires_grad_(True)
    g.surrogate(w_hat, wt, g.h.float()).backward()
    w64 = w_hat.detach().double().requires_grad_(True)
    F = torch.nn.functional
    p = layer.attrs["pads"]
    kw = dict(stride=layer.attrs["strides"], dilation=layer.attrs["dilations"], groups=layer.attrs["group"])
    at = F.pad(torch.from_numpy(a).double(), [p[1], p[3], p[0], p[2]])
    bt = at if b is None else F.pad(torch.from_numpy(b).double(), [p[1], p[3], p[0], p[2]])
    (((F.conv2d(at, w64, **kw) - F.conv2d(bt, wt.double(), **kw)) ** 2).sum() / len(a)).backward()
    np.testing.assert_allclose(w_hat.grad.numpy(), w64.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_gram_fit_never_worse_than_nearest_and_close_to_the_minibatch_fit(gran):
    layer, w, a = _conv(8, 16, size=12, n=48)
    qp = weight_qparams(w, WeightQuant(4, PerTensor() if gran == "tensor" else PerChannel(0), "mse"))
    g = adaptive_round(layer, w, qp, a, AdaRoundConfig(iterations=300, gram=True))
    m = adaptive_round(layer, w, qp, a, AdaRoundConfig(iterations=300, gram=False))
    nearest = quantize(w, qp).astype(np.int64)
    w_near = nearest * np.reshape(qp.scale, (-1, 1, 1, 1) if qp.axis is not None else ())
    # the reported errors are the direct ones
    assert g.error_nearest == pytest.approx(_direct(layer, w_near.astype(np.float32), w, a), rel=1e-5)
    w_g = g.q.astype(np.float64) * np.reshape(qp.scale, (-1, 1, 1, 1) if qp.axis is not None else ())
    assert g.error_adaptive == pytest.approx(_direct(layer, w_g.astype(np.float32), w, a), rel=1e-5)
    assert g.error_adaptive < 0.9 * g.error_nearest
    assert np.abs(g.q.astype(np.int64) - nearest).max() <= 1
    assert g.error_adaptive <= 1.1 * m.error_adaptive  # exact steps do at least about as well as minibatches
    again = adaptive_round(layer, w, qp, a, AdaRoundConfig(iterations=300, gram=True))
    np.testing.assert_array_equal(g.q, again.q)


def test_gram_fit_on_other_target_inputs_matches_its_direct_error():
    layer, w, a = _conv(6, 8, size=10, n=32)
    b = (a + np.random.default_rng(5).normal(0, 0.1, a.shape)).astype(np.float32)
    qp = weight_qparams(w, WeightQuant(4, PerChannel(0), "mse"))
    r = adaptive_round(layer, w, qp, a, AdaRoundConfig(iterations=200, gram=True), target_inputs=b)
    w_r = r.q.astype(np.float64) * np.reshape(qp.scale, (-1, 1, 1, 1))
    assert r.error_adaptive == pytest.approx(_direct(layer, w_r.astype(np.float32), w, a, b), rel=1e-5)
    assert r.error_adaptive <= r.error_nearest


def test_cost_rule_keeps_small_layers_on_minibatches_and_large_ones_on_the_gram_matrix():
    small, _, _ = _conv(16, 32, size=14)  # the record's MNIST CNN second conv: 11.6e9 multiply-adds per fit
    assert not use_gram(None, small, (128, 16, 14, 14), 400, 32)
    assert use_gram(True, small, (128, 16, 14, 14), 400, 32) and not use_gram(False, small, (128, 16, 14, 14), 400, 32)
    big, _, _ = _conv(64, 64, size=56)  # a ResNet-18 layer1 conv at 224x224
    assert 400 * 32 * 56 * 56 * 576 * 64 >= GRAM_MIN_MACS and use_gram(None, big, (128, 64, 56, 56), 400, 32)
    deep, _, _ = _conv(512, 512, size=7)  # layer4: 49 positions, D = 4608: minibatches are cheaper
    assert not use_gram(None, deep, (128, 512, 7, 7), 400, 32)
    gemm = Layer(name="g", op_type="Gemm", weight="w", weight_shape=(10, 64), bias=None, input="x", output="y",
                 input_shape=(1, 64), output_shape=None, attrs={}, channel_axis=0, index=0)
    assert not use_gram(True, gemm, (128, 64), 400, 32)  # only 2-D convolutions
