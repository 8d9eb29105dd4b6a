"""laqonnx.quant.numerics against onnxruntime's QuantizeLinear/DequantizeLinear and its quantizer's own maths."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import quant_utils

from laqonnx.quant.numerics import (
    ActivationQuant,
    PerChannel,
    PerTensor,
    QParams,
    WeightQuant,
    activation_qparams,
    dequantize,
    fake_quant,
    quantize,
    quantize_weight,
    relative_weight_error,
    weight_qparams,
)

TYPES = {  # (bits, signed) -> onnx type
    (8, True): TensorProto.INT8,
    (8, False): TensorProto.UINT8,
    (4, True): TensorProto.INT4,
    (4, False): TensorProto.UINT4,
    (16, True): TensorProto.INT16,
    (16, False): TensorProto.UINT16,
}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _qdq_model(qp: QParams, opset: int, op: str) -> onnx.ModelProto:
    """QuantizeLinear -> Cast(int32) when op == 'q'; Cast(int32 -> type) -> DequantizeLinear when op == 'dq'."""
    kw = {} if qp.axis is None else {"axis": qp.axis}
    zp = helper.make_tensor("z", qp.onnx_type, list(qp.zero_point.shape), qp.zero_point.ravel().tolist())
    inits = [numpy_helper.from_array(qp.scale, "s"), zp]
    if op == "q":
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kw),
            helper.make_node("Cast", ["q"], ["y"], to=TensorProto.INT32),
        ]
        io = (TensorProto.FLOAT, TensorProto.INT32)
    else:
        nodes = [
            helper.make_node("Cast", ["x"], ["q"], to=qp.onnx_type),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kw),
        ]
        io = (TensorProto.INT32, TensorProto.FLOAT)
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", io[0], None)], [helper.make_tensor_value_info("y", io[1], None)], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _random_qparams(rng: np.random.Generator, bits: int, signed: bool, axis: int | None, channels: int) -> QParams:
    tmin, tmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    shape = () if axis is None else (channels,)
    scale = rng.uniform(0.002, 0.2, shape).astype(np.float32)
    scale.flat[0] = 0.125  # a power of two: exact .5 ties below
    zp = rng.integers(tmin // 2, tmax // 2 + 1, shape) if signed else rng.integers(0, tmax + 1, shape)
    return QParams(scale=scale, zero_point=zp, bits=bits, signed=signed, axis=axis)


def _data(rng: np.random.Generator, qp: QParams, shape: tuple[int, ...]) -> np.ndarray:
    """Values around the representable range and beyond it, with exact and near .5 ties."""
    scale = qp._broadcast(len(shape))[0]
    span = (qp.qmax - qp.qmin) * 1.3
    k = rng.integers(-int(span), int(span) + 1, shape).astype(np.float32)
    ties = ((k + np.float32(0.5)) * scale).astype(np.float32)
    nudge = rng.integers(-2, 3, shape) * np.spacing(ties)
    x = np.where(rng.uniform(size=shape) < 0.5, ties, ties + nudge).astype(np.float32)
    x.flat[:4] = [1e30, -1e30, 0.0, -0.0]
    return x


CASES = [
    (bits, signed, opset)
    for (bits, signed) in TYPES
    for opset in ((13, 19, 21) if bits == 8 else (21,))
]


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("bits,signed,opset", CASES)
def test_quantize_and_dequantize_bit_exact_with_onnxruntime(bits: int, signed: bool, opset: int, axis: int | None) -> None:
    rng = np.random.default_rng(bits * 100 + opset + (axis or 0) * 7 + signed)
    shape = (6, 5, 40, 21)
    qp = _random_qparams(rng, bits, signed, axis, shape[axis] if axis is not None else 1)
    x = _data(rng, qp, shape)
    expected = _session(_qdq_model(qp, opset, "q")).run(None, {"x": x})[0]
    q = quantize(x, qp)
    assert q.dtype == qp.storage_dtype
    np.testing.assert_array_equal(q.astype(np.int32), expected)
    assert q.min() == qp.qmin and q.max() == qp.qmax  # saturation reached on both sides
    deq = _session(_qdq_model(qp, opset, "dq")).run(None, {"x": expected})[0]
    got = dequantize(q, qp)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.int32), deq.view(np.int32))
    np.testing.assert_array_equal(fake_quant(x, qp), got)


def test_quantize_divides_by_scale_not_reciprocal() -> None:
    """On near-tie data x/s and x*(1/s) round differently; ONNX semantics (and ORT) divide."""
    rng = np.random.default_rng(3)
    qp = QParams(scale=np.float32(0.0137), zero_point=0, bits=16, signed=True)
    k = rng.integers(-1000, 1000, 50_000)
    x = ((k + 0.5) * qp.scale).astype(np.float32)
    x = (x + rng.integers(-1, 2, x.shape) * np.spacing(x)).astype(np.float32)
    reciprocal = np.rint(x * (np.float32(1) / qp.scale))
    assert np.any(reciprocal != quantize(x, qp))  # the data does discriminate the two
    expected = _session(_qdq_model(qp, 21, "q")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(quantize(x, qp).astype(np.int32), expected)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [8, 16])
def test_activation_qparams_match_onnxruntime_compute_scale_zp(bits: int, symmetric: bool) -> None:
    rng = np.random.default_rng(bits + symmetric)
    qtype = {(8, False): TensorProto.UINT8, (8, True): TensorProto.INT8, (16, False): TensorProto.UINT16, (16, True): TensorProto.INT16}[
        (bits, symmetric)
    ]
    qmin, qmax = quant_utils.get_qmin_qmax_for_qType(qtype, symmetric=symmetric)
    ranges = [(0.0, 0.0), (0.5, 3.0), (-2.0, -0.25), (-1.0, 1.0), (-1e-3, 7.9)]
    ranges += [tuple(sorted(rng.normal(0, 10 ** rng.uniform(-3, 2), 2).tolist())) for _ in range(300)]
    spec = ActivationQuant(bits=bits, symmetric=symmetric)
    for rmin, rmax in ranges:
        zp, scale = quant_utils.compute_scale_zp(np.array(rmin, np.float32), np.array(rmax, np.float32), qmin, qmax, symmetric)
        qp = activation_qparams(rmin, rmax, spec)
        assert qp.onnx_type == qtype and qp.axis is None
        assert qp.scale.dtype == np.float32 and qp.scale == scale, (rmin, rmax)
        assert int(qp.zero_point) == int(zp), (rmin, rmax)


def test_activation_qparams_range_includes_zero_and_default_is_uint8() -> None:
    qp = activation_qparams(0.5, 2.0, ActivationQuant())
    assert qp.onnx_type == TensorProto.UINT8 and int(qp.zero_point) == 0
    assert qp.scale == np.float32(2.0 / 255)
    qp = activation_qparams(-3.0, -1.0, ActivationQuant())
    assert int(qp.zero_point) == 255
    assert activation_qparams(-1, 1, ActivationQuant(bits=16, symmetric=True)).onnx_type == TensorProto.INT16


@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0), PerChannel(1)])
@pytest.mark.parametrize("bits", [8, 4])
def test_maxabs_weights_are_symmetric_restricted_range(bits: int, granularity) -> None:
    rng = np.random.default_rng(bits)
    w = rng.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32)
    qp = weight_qparams(w, WeightQuant(bits=bits, granularity=granularity))
    qmax = 2 ** (bits - 1) - 1
    assert qp.signed and np.all(qp.zero_point == 0) and qp.bits == bits
    assert qp.onnx_type == (TensorProto.INT8 if bits == 8 else TensorProto.INT4)
    axes = tuple(range(w.ndim)) if isinstance(granularity, PerTensor) else tuple(i for i in range(4) if i != granularity.axis)
    absmax = np.abs(w).max(axis=axes)
    np.testing.assert_array_equal(qp.scale, (absmax.astype(np.float64) / qmax).astype(np.float32))
    q = quantize(w, qp)
    assert np.abs(q).max() == qmax
    assert np.all(np.abs(q).max(axis=axes) == qmax)  # every channel uses its full range


def test_int8_weights_match_onnxruntime_quantize_data() -> None:
    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.2, 500).astype(np.float32)
    zp, scale, q_ort = quant_utils.quantize_data(w, TensorProto.INT8, symmetric=True)
    qp = weight_qparams(w, WeightQuant())
    assert qp.scale == scale and int(qp.zero_point) == int(zp)
    np.testing.assert_array_equal(quantize(w, qp), q_ort)


@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0)])
@pytest.mark.parametrize("bits", [8, 4])
def test_mse_clip_never_worse_than_maxabs(bits: int, granularity) -> None:
    rng = np.random.default_rng(11)
    w = rng.standard_t(3, (16, 8, 3, 3)).astype(np.float32)  # heavy tails: clipping pays off
    e_max = relative_weight_error(w, WeightQuant(bits=bits, granularity=granularity))
    e_mse = relative_weight_error(w, WeightQuant(bits=bits, granularity=granularity, method="mse"))
    assert e_mse <= e_max
    if bits == 4:  # per channel the tails are split among channels: a smaller but strict gain
        assert e_mse < (0.9 if isinstance(granularity, PerTensor) else 0.97) * e_max
    # brute force over the same grid, per tensor: the search returns the best clip
    if isinstance(granularity, PerTensor):
        from laqonnx.quant.numerics import MSE_CLIP_RATIOS

        a = np.abs(w).max()
        qm = 2 ** (bits - 1) - 1
        errs = []
        for r in MSE_CLIP_RATIOS:
            s = np.float32(np.float64(np.float32(a * np.float32(r))) / qm)
            wq = np.clip(np.rint(w / s), -qm - 1, qm) * s
            errs.append(np.linalg.norm(w - wq) / np.linalg.norm(w))
        assert e_mse == pytest.approx(min(errs), rel=1e-5)


def test_percentile_clip() -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(0, 1, (4, 1000)).astype(np.float32)
    qp = weight_qparams(w, WeightQuant(method="percentile", percentile=99.0))
    assert qp.scale == np.float32(np.percentile(np.abs(w), 99.0) / 127)
    qp_c = weight_qparams(w, WeightQuant(method="percentile", percentile=99.0, granularity=PerChannel(0)))
    np.testing.assert_allclose(qp_c.scale, np.percentile(np.abs(w), 99.0, axis=1) / 127, rtol=1e-6)
    full = weight_qparams(w, WeightQuant(method="percentile", percentile=100.0))
    assert full.scale == weight_qparams(w, WeightQuant()).scale
    q = quantize(w, qp)
    assert q.min() == -128 and q.max() == 127  # clipped values saturate like QuantizeLinear


def test_relative_weight_error_against_explicit_formula() -> None:
    rng = np.random.default_rng(4)
    w = rng.normal(0, 0.1, (10, 20)).astype(np.float32)
    s = (np.abs(w).max(axis=1).astype(np.float64) / 7).astype(np.float32)[:, None]
    wq = np.clip(np.rint(w / s), -8, 7) * s
    expected = np.linalg.norm(w - wq) / np.linalg.norm(w)
    spec = WeightQuant(bits=4, granularity=PerChannel(0))
    assert relative_weight_error(w, spec) == pytest.approx(expected, rel=1e-6)
    wq2, qp = quantize_weight(w, spec)
    np.testing.assert_array_equal(wq2, wq.astype(np.float32))
    assert relative_weight_error(np.zeros((3, 3)), WeightQuant()) == 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: WeightQuant(bits=6),
        lambda: WeightQuant(bits=16),
        lambda: WeightQuant(method="entropy"),
        lambda: WeightQuant(percentile=101.0),
        lambda: WeightQuant(granularity="channel"),
        lambda: PerChannel(axis=1.5),
        lambda: ActivationQuant(bits=2),  # 4-bit activations are supported (W4A4 regime)
        lambda: ActivationQuant(method="maxabs"),
        lambda: ActivationQuant(percentile=10.0),
        lambda: QParams(scale=np.float32(0.0), zero_point=0, bits=8, signed=True),
        lambda: QParams(scale=np.ones(3, np.float32), zero_point=np.zeros(3), bits=8, signed=True, axis=None),
        lambda: QParams(scale=np.float32(1), zero_point=0, bits=5, signed=True),
        lambda: activation_qparams(2.0, 1.0, ActivationQuant()),
        lambda: weight_qparams(np.ones((2, 2)), WeightQuant(granularity=PerChannel(2))),
    ],
)
def test_invalid_specs_raise_value_error(make) -> None:
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("method", ["maxabs", "mse", "percentile"])
@pytest.mark.parametrize("bits", [8, 4])
def test_weights_match_onnxruntime_quantizer_with_our_scales(bits: int, method: str) -> None:
    """What onnxruntime's quantizer stores for a weight given our (float32) scale/zero point override."""
    rng = np.random.default_rng(bits)
    w = rng.standard_t(3, (8, 3, 3, 3)).astype(np.float32)
    spec = WeightQuant(bits=bits, method=method, percentile=99.0, granularity=PerChannel(0))
    _, qp = quantize_weight(w, spec)
    for c in range(w.shape[0]):
        q_ort = quant_utils.quantize_nparray(qp.onnx_type, w[c].ravel(), np.float32(qp.scale[c]), qp.zero_point[c])
        np.testing.assert_array_equal(quantize(w, qp)[c].ravel(), q_ort)


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (32, 64)])
def test_mse_clip_per_channel_matches_the_full_grid(shape) -> None:
    """8-bit per channel: the coarse-to-fine search finds, per channel, the brute-force optimum of
    the whole MSE_CLIP_RATIOS grid (fake_quant errors, ties to the larger clip)."""
    from laqonnx.quant.numerics import MSE_CLIP_RATIOS

    w = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    qp = weight_qparams(w, WeightQuant(granularity=PerChannel(0), method="mse"))
    maxabs = np.abs(w).reshape(shape[0], -1).max(axis=1)
    for c in range(shape[0]):
        best, best_err = None, np.inf
        for r in MSE_CLIP_RATIOS[::-1]:
            clip = np.float32(maxabs[c] * np.float32(r))
            s = np.float32(np.float64(clip) * 2 / 254)
            wq = np.clip(np.rint(w[c] / s), -128, 127).astype(np.float32) * s
            err = float(np.sum((wq.astype(np.float64) - w[c]) ** 2))
            if err < best_err:
                best, best_err = s, err
        assert qp.scale[c] == best, c


@pytest.mark.parametrize("bits,reduce_range", [(8, False), (4, False), (8, True)])
def test_mse_errors_equal_the_float64_sum_of_fake_quant_errors(bits: int, reduce_range: bool) -> None:
    """The broadcast MSE pass (float32 difference) against fake_quant and a float64 difference,
    over the whole clip grid down to 0.30 x max-abs (entries clipped by more than 2x, zero levels,
    an all-zero channel): on the ratios >= 0.5 the float32 difference is exact and the sums agree to
    1e-12 (summation order); below, entries clipped by more than 2x round in float32, within
    2^-24 of each difference."""
    from laqonnx.quant.numerics import MSE_CLIP_RATIOS, QParams, _mse_errors, fake_quant

    r = np.random.default_rng(bits)
    w2 = r.standard_t(2, (5, 301)).astype(np.float32)
    w2[2] = 0.0
    maxabs = np.abs(w2).max(axis=1)
    clip = (np.where(maxabs > 0, maxabs, 1.0)[None] * MSE_CLIP_RATIOS.astype(np.float32)[:, None]).astype(np.float32)
    qmax = 63 if reduce_range else 2 ** (bits - 1) - 1
    got = _mse_errors(w2, clip, qmax)
    for i, ratio in enumerate(MSE_CLIP_RATIOS):
        qp = QParams(scale=(clip[i] / np.float32(qmax)).astype(np.float32), zero_point=np.zeros(5, np.int64), bits=bits,
                     signed=True, axis=0, reduce_range=reduce_range)
        assert np.array_equal(qp.scale, (clip[i].astype(np.float64) * 2 / (2 * qmax)).astype(np.float32))
        d = fake_quant(w2, qp).astype(np.float64) - w2.astype(np.float64)
        want = (d * d).sum(axis=1)
        np.testing.assert_allclose(got[i], want, rtol=1e-12 if ratio >= 0.5 else 2.0**-23, atol=0)
        if ratio >= 0.5:
            d32 = fake_quant(w2, qp) - w2
            assert np.array_equal(d32.astype(np.float64), d)  # Sterbenz: the float32 difference is exact
    assert np.all(got[:, 2] == 0.0)


def test_reduce_range_keeps_int8_weights_in_7_bits_and_saturates_there() -> None:
    """reduce_range: scale = clip / 63, every stored value in [-64, 63] (a clipped MSE range saturates
    at 63, not 127); stored as int8; only for int8."""
    from laqonnx.errors import OptionError
    from laqonnx.quant.numerics import QParams, WeightQuant, quantize, weight_qparams

    w = np.random.default_rng(0).standard_t(2, (16, 40)).astype(np.float32)
    for method in ("maxabs", "mse", "percentile"):
        spec = WeightQuant(8, PerChannel(0), method, reduce_range=True)
        qp = weight_qparams(w, spec)
        q = quantize(w, qp)
        assert q.dtype == np.int8 and q.min() >= -64 and q.max() <= 63
        if method == "maxabs":
            np.testing.assert_allclose(qp.scale, np.abs(w).max(axis=1) / 63, rtol=1e-6)
            assert np.abs(q).max() == 63
        else:  # clipped below max-abs: the outliers saturate at the 7-bit bounds
            assert q.max() == 63 or q.min() == -64
    with pytest.raises(OptionError, match="int8 weights only"):
        WeightQuant(4, reduce_range=True)
    with pytest.raises(ValueError, match="int8 only"):
        QParams(scale=np.float32(1.0), zero_point=np.int64(0), bits=4, signed=True, reduce_range=True)
