"""laqonnx.calibrate: exact streaming/merging, ranges vs numpy and onnxruntime, error estimates vs measurement."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from laqonnx.calibrate import (
    StatsCollector,
    TensorStats,
    activation_error,
    activation_norm,
    activation_range,
    collect,
)
from laqonnx.data import ArraySource
from laqonnx.errors import DataError, ModelError
from laqonnx.quantizers import ActivationQuant, activation_qparams, fake_quant
from tests.models import cnn, random_input

METHODS = ("minmax", "percentile", "entropy", "mse")
SPECS = [ActivationQuant(method=m, symmetric=s) for m in METHODS for s in (False, True)]


def _batches(seed: int = 0) -> list[np.ndarray]:
    """Batches whose ranges grow a lot (forcing re-binning) and shrink again."""
    rng = np.random.default_rng(seed)
    return [
        rng.normal(0.2, 0.01, (3, 50)).astype(np.float32),
        rng.normal(0, 1, (5, 50)).astype(np.float32),
        np.maximum(rng.normal(0, 8, (4, 50)), 0).astype(np.float32),
        rng.laplace(-1, 3, (2, 50)).astype(np.float32),
        rng.uniform(-0.1, 0.1, (6, 50)).astype(np.float32),
    ]


def _same(a: TensorStats, b: TensorStats) -> None:
    assert (a.min, a.max, a.n_examples, a.numel, a.zeros) == (b.min, b.max, b.n_examples, b.numel, b.zeros)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.edges, b.edges)
    assert a.sum_sq == pytest.approx(b.sum_sq, rel=1e-6)


@pytest.mark.parametrize("bins", [64, 2048])
def test_histogram_counts_are_exact(bins: int) -> None:
    x = np.concatenate(_batches(1))
    st = TensorStats.from_array("t", x, bins)
    flat = x.ravel().astype(np.float64)
    # independent binning: half-open bins [e_j, e_j+1)
    idx = np.searchsorted(st.edges, flat, side="right") - 1
    np.testing.assert_array_equal(st.counts, np.bincount(idx, minlength=bins))
    assert st.total == flat.size and st.n_examples == len(x) and st.numel == 50
    w = st.width
    assert w == 2.0 ** np.round(np.log2(w)) and np.all(np.diff(st.edges) == w)
    assert st.edges[0] <= flat.min() and flat.max() < st.edges[-1]
    assert (flat.max() - flat.min()) > w * bins / 4  # the window is not wastefully coarse
    assert st.sum_sq == pytest.approx(float(np.sum(flat**2)), rel=1e-6)


def test_streaming_equals_all_at_once_exactly() -> None:
    batches = _batches()
    collector = StatsCollector(bins=512)
    for b in batches:
        collector.update("t", b)
    streamed = collector.result()["t"]
    whole = TensorStats.from_array("t", np.concatenate(batches), 512)
    _same(streamed, whole)
    for spec in SPECS:
        assert activation_range(streamed, spec) == activation_range(whole, spec), spec


def test_merge_is_associative_and_commutative() -> None:
    parts = [TensorStats.from_array("t", b, 256) for b in _batches(2)]
    reference = TensorStats.from_array("t", np.concatenate(_batches(2)), 256)
    first4 = TensorStats.from_array("t", np.concatenate(_batches(2)[:4]), 256)
    for a, b, c, d in itertools.permutations(parts[:4]):
        _same(((a.merge(b)).merge(c)).merge(d), first4)
        _same(a.merge(b.merge(c.merge(d))), (a.merge(b)).merge(c.merge(d)))
    full = parts[0]
    for p in parts[1:]:
        full = full.merge(p)
    _same(full, reference)
    with pytest.raises(ValueError):
        parts[0].merge(TensorStats.from_array("other", _batches()[0], 256))
    with pytest.raises(DataError):
        parts[0].merge(TensorStats.from_array("t", np.zeros((2, 7), np.float32), 256))


@pytest.mark.parametrize("percentile", [99.0, 99.9])
@pytest.mark.parametrize("dist", ["normal", "relu", "uniform"])
def test_percentile_matches_numpy_within_a_bin(percentile: float, dist: str) -> None:
    rng = np.random.default_rng(3)
    x = {"normal": rng.normal(0.5, 2, (400, 250)), "relu": np.maximum(rng.normal(0, 1, (400, 250)), 0), "uniform": rng.uniform(-3, 5, (400, 250))}[dist]
    x = x.astype(np.float32)
    st = TensorStats.from_array("t", x)
    lo, hi = activation_range(st, ActivationQuant(method="percentile", percentile=percentile))
    cut = (100 - percentile) / 2
    np_lo, np_hi = np.percentile(x, [cut, 100 - cut])
    assert abs(lo - max(np_lo, x.min())) <= st.width and abs(hi - np_hi) <= st.width
    slo, shi = activation_range(st, ActivationQuant(method="percentile", percentile=percentile, symmetric=True))
    t = np.percentile(np.abs(x), percentile)
    assert abs(shi - min(t, x.max())) <= st.width and abs(slo - max(-t, x.min())) <= st.width


def test_minmax_and_constant_tensors() -> None:
    x = _batches()[1]
    st = TensorStats.from_array("t", x)
    assert activation_range(st, ActivationQuant()) == (float(x.min()), float(x.max()))
    zero = TensorStats.from_array("z", np.zeros((3, 4), np.float32))
    for spec in SPECS:
        assert activation_range(zero, spec) == (0.0, 0.0)
    assert activation_error(zero, 0.0, 0.0, ActivationQuant()) == 0.0
    const = TensorStats.from_array("c", np.full((3, 4), 2.5, np.float32)).merge(TensorStats.from_array("c", np.full((1, 4), 2.5, np.float32)))
    assert activation_range(const, ActivationQuant(method="mse")) == (2.5, 2.5) and const.total == 16


def test_entropy_clips_outliers_keeps_dense_ranges() -> None:
    rng = np.random.default_rng(4)
    spec = ActivationQuant(method="entropy", symmetric=True)
    u = rng.uniform(-1, 1, (200, 500)).astype(np.float32)
    lo, hi = activation_range(TensorStats.from_array("u", u), spec)
    assert hi >= 0.95 * u.max() and lo <= 0.95 * u.min()
    x = rng.standard_t(3, (200, 500)).astype(np.float32)  # continuous heavy tails
    p99 = np.percentile(np.abs(x), 99)
    lo, hi = activation_range(TensorStats.from_array("x", x), spec)
    assert p99 < hi < 0.5 * x.max() and -0.5 * x.max() < lo < -p99
    relu = np.maximum(x, 0)
    lo, hi = activation_range(TensorStats.from_array("r", relu), ActivationQuant(method="entropy"))
    assert lo == 0.0 and p99 < hi < 0.5 * x.max()  # the spike of exact zeros does not drag the threshold down


def test_entropy_agrees_with_onnxruntime_calibrator(tmp_path) -> None:
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    rng = np.random.default_rng(0)
    x = rng.laplace(0, 1, (400, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "one"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])],
        [onnx.numpy_helper.from_array(np.float32(1), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"x": x[i : i + 50]} for i in range(0, 400, 50))

        def get_next(self):
            return next(self.it, None)

    cal = create_calibrator(
        tmp_path / "m.onnx",
        None,
        augmented_model_path=str(tmp_path / "aug.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": 2048, "num_quantized_bins": 256, "symmetric": True},
    )
    cal.collect_data(Reader())
    ort_hi = float(cal.compute_data()["x"].range_value[1])
    lo, hi = activation_range(TensorStats.from_array("x", x), ActivationQuant(method="entropy", symmetric=True))
    assert hi == pytest.approx(ort_hi, rel=0.1) and lo == pytest.approx(-ort_hi, rel=0.1)


def _measured(x: np.ndarray, rng_: tuple[float, float], spec: ActivationQuant) -> float:
    qp = activation_qparams(*rng_, spec)
    err = (x - fake_quant(x, qp)).reshape(len(x), -1).astype(np.float64)
    return float(np.sqrt(np.mean(np.sum(err**2, axis=1))))


@pytest.mark.parametrize("spec", SPECS + [ActivationQuant(bits=16, method="percentile", percentile=99.0)])
@pytest.mark.parametrize("dist", ["normal", "relu", "heavy"])
def test_activation_error_predicts_measured_error(spec: ActivationQuant, dist: str) -> None:
    rng = np.random.default_rng(5)
    x = {"normal": rng.normal(0, 1, (300, 200)), "relu": np.maximum(rng.normal(0.3, 1, (300, 200)), 0), "heavy": rng.standard_t(3, (300, 200))}[dist]
    x = x.astype(np.float32)
    st = TensorStats.from_array("t", x)
    r = activation_range(st, spec)
    assert activation_error(st, *r, spec) == pytest.approx(_measured(x, r, spec), rel=0.15)
    clipped = (0.5 * r[0], 0.5 * r[1])  # clipping error dominates
    assert activation_error(st, *clipped, spec) == pytest.approx(_measured(x, clipped, spec), rel=0.15)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_range_minimises_estimated_error(symmetric: bool) -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_t(2, (200, 300)).astype(np.float32)
    st = TensorStats.from_array("t", x)
    spec = ActivationQuant(method="mse", symmetric=symmetric)
    r = activation_range(st, spec)
    best = activation_error(st, *r, spec)
    brute = min(activation_error(st, c * st.min, c * st.max, spec) for c in np.linspace(0.01, 1.0, 500))
    assert best <= brute * 1.001
    assert r[1] < st.max and best < activation_error(st, st.min, st.max, spec)  # heavy tails get clipped
    assert _measured(x, r, spec) < _measured(x, (st.min, st.max), spec)


def test_activation_norm() -> None:
    x = _batches()[2]
    st = TensorStats.from_array("t", x)
    assert activation_norm(st) == pytest.approx(np.sqrt(np.mean(np.sum(x.astype(np.float64) ** 2, axis=1))), rel=1e-6)


def test_collect_matches_onnxruntime_intermediates() -> None:
    model = cnn(seed=1)
    names = ["input", "c1", "r1", "c2", "r2", "logits"]
    x = random_input(model, n=10, seed=3)
    source = ArraySource(x)
    stats = collect(model, names, source.batches(4), bins=256, progress=False, total=len(source))
    assert list(stats) == names
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for n in names[1:-1]:
        probe.graph.output.append(onnx.ValueInfoProto(name=n))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    outs["input"] = x
    for n in names:
        st = stats[n]
        assert (st.min, st.max) == (float(outs[n].min()), float(outs[n].max())), n
        assert st.n_examples == 10 and st.numel == outs[n][0].size
        assert st.sum_sq == pytest.approx(float(np.sum(outs[n].astype(np.float64) ** 2)), rel=1e-5)
        _same_counts = TensorStats.from_array(n, outs[n], 256)
        np.testing.assert_array_equal(st.counts, _same_counts.counts)
    assert len(model.graph.output) == 1  # the caller's model is untouched


def test_collect_errors() -> None:
    model = cnn()
    with pytest.raises(ModelError, match="nope"):
        collect(model, ["c1", "nope"], [random_input(model)], progress=False)
    with pytest.raises(DataError, match="no calibration batches"):
        collect(model, ["c1"], [], progress=False)
    bad = random_input(model)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        collect(model, ["c1"], [bad], progress=False)
    with pytest.raises(ValueError):
        StatsCollector(bins=4)


def test_minmax_only_tensors_skip_the_histogram_but_keep_exact_summaries() -> None:
    model = cnn()
    names = [i.name for i in model.graph.input] + [n.output[0] for n in model.graph.node]
    x = random_input(model, n=10, seed=4)
    full = collect(model, names, [x[:4], x[4:]], bins=256, progress=False)
    cheap = names[1::2]
    part = collect(model, names, [x[:4], x[4:]], bins=256, progress=False, minmax_only=cheap)
    for n in names:
        a, b = full[n], part[n]
        assert (a.min, a.max, a.n_examples, a.numel, a.zeros) == (b.min, b.max, b.n_examples, b.numel, b.zeros), n
        assert b.sum_sq == pytest.approx(a.sum_sq, rel=1e-12)
        assert activation_range(b, ActivationQuant()) == (a.min, a.max)
        if n in cheap:
            assert not b.histogram and b.total == 0
            for spec in SPECS[2:]:
                if a.min != a.max:
                    with pytest.raises(ValueError, match="without a histogram"):
                        activation_range(b, spec)
            with pytest.raises(ValueError, match="without a histogram"):
                activation_error(b, a.min, a.max, ActivationQuant())
        else:
            assert b.histogram
            np.testing.assert_array_equal(a.counts, b.counts)
            for spec in SPECS:
                assert activation_range(b, spec) == activation_range(a, spec)
