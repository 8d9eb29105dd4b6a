"""laqonnx.quant.stats, .collect, .ranges: exact streaming/merging, ranges vs numpy and onnxruntime, error estimates vs measurement."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from laqonnx.quant.collect import collect
from laqonnx.quant.ranges import (
    _folded,
    _kl_scores,
    _kl_threshold,
    _smooth,
    _sq_error,
    _sq_errors,
    activation_error,
    activation_norm,
    activation_range,
)
from laqonnx.quant.stats import _BLOCK, StatsCollector, TensorStats
from laqonnx.data import ArraySource
from laqonnx.errors import DataError, ModelError
from laqonnx.quant.numerics import ActivationQuant, activation_qparams, fake_quant
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


def _from_array_whole(x: np.ndarray, bins: int) -> tuple:
    """The whole-array computation that from_array does block by block: min, max, counts, sum_sq, zeros."""
    flat = x.reshape(-1).astype(np.float32) if x.dtype == np.float16 else x.reshape(-1)
    lo, hi = float(flat.min()), float(flat.max())
    st = TensorStats.from_array("t", x, bins)
    e, start = st._exp, st._start
    idx = np.floor(np.ldexp(flat, np.int32(-e))).astype(np.int64) - start  # ldexp in the input's precision
    counts = np.bincount(idx, minlength=bins)
    sum_sq = float(np.square(flat).sum(dtype=np.float64))
    return lo, hi, counts, sum_sq, int(flat.size - np.count_nonzero(flat)), st


@pytest.mark.parametrize("case", ["relu", "signed", "float64", "float16", "tiny", "coarse", "subnormal"])
def test_blockwise_stats_equal_whole_array(case: str) -> None:
    rng = np.random.default_rng(11)
    n = 2 * _BLOCK + 1234  # several blocks, the last one partial
    x = rng.laplace(0, 1, (3, n // 3))
    x = {
        "relu": np.maximum(x, 0).astype(np.float32),
        "signed": x.astype(np.float32),
        "float64": x,
        "float16": x.astype(np.float16),
        "tiny": (x * 1e-38).astype(np.float32),  # 2^-e is not a normal float32: the ldexp path
        "coarse": np.where(np.abs(x) < 1, x * 1e-44, x * 1e4).astype(np.float32),  # e > 0: x 2^-e rounds to 0
        "subnormal": (x * 1e-42).astype(np.float32),
    }[case]
    x.reshape(-1)[::7] = 0.0
    x.reshape(-1)[1::97] = -0.0
    lo, hi, counts, sum_sq, zeros, st = _from_array_whole(x, 2048)
    assert (st.min, st.max, st.zeros, st.numel) == (lo, hi, zeros, x.size // 3)
    np.testing.assert_array_equal(st.counts, counts)
    assert st.sum_sq == pytest.approx(sum_sq, rel=1e-12)
    cheap = TensorStats.from_array("t", x, 2048, histogram=False)
    assert (cheap.min, cheap.max, cheap.zeros, cheap.sum_sq) == (st.min, st.max, st.zeros, st.sum_sq)


def _kl_scores_loop(hist: np.ndarray, nq: int) -> dict[int, float]:
    """The loop _kl_threshold replaced, one candidate at a time: the KL of each kept candidate."""
    hist = np.trim_zeros(hist, "b")
    scores = {}
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0]])
    for i in range(nq, hist.size + 1):
        sliced = hist[:i]
        p = sliced.astype(np.float64)
        p[-1] += suffix[i]
        merged = i // nq
        groups = np.minimum(np.arange(i) // merged, nq - 1)
        q_tot = np.bincount(groups, weights=sliced, minlength=nq)
        nonzero = np.bincount(groups, weights=(p != 0), minlength=nq)
        q = np.where(p != 0, q_tot[groups] / np.maximum(nonzero[groups], 1), 0.0)
        ps, qs = _smooth(p), _smooth(q)
        if ps is None or qs is None or np.any(qs <= 0):
            continue
        ps, qs = ps / ps.sum(), qs / qs.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            scores[i] = float(np.sum(ps * np.log(ps / qs)))
    return scores


def _kl_threshold_loop(hist: np.ndarray, nq: int) -> int:
    hist = np.trim_zeros(hist, "b")
    if hist.size <= nq:
        return hist.size
    best_i, best_kl = hist.size, np.inf
    for i, kl in _kl_scores_loop(hist, nq).items():
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


def _kl_histograms() -> list[np.ndarray]:
    rng = np.random.default_rng(12)
    hists = []
    for x in (
        np.maximum(rng.normal(0, 1, (64, 4000)), 0),  # relu-like: one-sided, spike of zeros
        rng.laplace(0, 1, (64, 4000)),  # dense, heavy-ish tails
        rng.standard_t(2, (64, 4000)),  # far outliers: a sparse tail of isolated bins
        rng.uniform(-1, 1, (8, 100)),  # few samples: many empty bins
    ):
        st = TensorStats.from_array("t", x.astype(np.float32))
        fold = _folded(st)
        fold[0] -= st.zeros
        hists.append(fold)
    hists += [
        rng.poisson(0.3, 1500),  # sparse, many empty bins
        (rng.random(900) < 0.03) * rng.integers(1, 1000, 900),  # very sparse
        rng.integers(0, 3, 700),
        np.full(600, 7),  # flat
        np.r_[rng.poisson(50, 300), np.zeros(1000, np.int64), [3]],  # dense part, gap, one far outlier
        rng.poisson(5, 130),  # <= nq for nq = 255: all bins kept
        rng.poisson(5, 256),  # one candidate more than nq
        np.array([0, 4, 0, 0, 2, 0, 0, 0]),  # tiny
    ]
    return [np.asarray(h, dtype=np.int64) for h in hists]


@pytest.mark.parametrize("nq", [255, 127, 7])
def test_kl_threshold_matches_the_loop(nq: int) -> None:
    for h in _kl_histograms():
        fast, slow = _kl_threshold(h, nq), _kl_threshold_loop(h, nq)
        loop = _kl_scores_loop(h, nq)
        if fast != slow:  # a tie within rounding: the fast score sums in another order
            assert loop[fast] == pytest.approx(loop[slow], rel=1e-12, abs=0), (h.size, nq, fast, slow)
        trimmed = np.trim_zeros(h, "b")
        if trimmed.size > nq:  # every score, not only the best: same skips, same values to rounding
            cand, kl = _kl_scores(trimmed, nq)
            ref = np.array([loop.get(int(i), np.inf) for i in cand])
            ref[np.isnan(ref)] = np.inf
            np.testing.assert_array_equal(np.isinf(kl), np.isinf(ref))
            np.testing.assert_allclose(kl[np.isfinite(kl)], ref[np.isfinite(ref)], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dist", ["relu", "heavy", "edges"])
def test_sq_errors_match_sq_error_per_range(dist: str) -> None:
    rng = np.random.default_rng(13)
    x = {
        "relu": np.maximum(rng.normal(0.3, 1, (50, 400)), 0),
        "heavy": rng.standard_t(2, (50, 400)),
        "edges": np.round(rng.normal(0, 4, (50, 400))) / 4,  # values and range bounds on bin edges
    }[dist].astype(np.float32)
    ratios = np.r_[np.linspace(0.01, 1.0, 100), 1e-7, 1e-4, 0.5, 1.5]  # down to ranges narrower than a bin
    for bins in (16, 2048):
        st = TensorStats.from_array("t", x, bins)
        for spec in [ActivationQuant(method="mse", symmetric=s, bits=b) for s in (False, True) for b in (8, 16)]:
            fast = _sq_errors(st, ratios * st.min, ratios * st.max, spec)
            slow = [_sq_error(st, r * st.min, r * st.max, spec) for r in ratios]
            np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=0)
    # counts too large for int64 moments (Python integers)
    big = TensorStats("t", st.min, st.max, st.counts * 10**13, st.edges, 50, 400, 1.0, st.zeros * 10**13)
    spec = ActivationQuant(method="mse")
    fast = _sq_errors(big, ratios * st.min, ratios * st.max, spec)
    slow = [_sq_error(big, r * st.min, r * st.max, spec) for r in ratios]
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=0)
