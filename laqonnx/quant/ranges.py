"""Activation ranges and errors from calibration statistics.

:func:`activation_range` turns a :class:`~laqonnx.quant.stats.TensorStats` into a clip range
(min-max, percentile, KL entropy as TensorRT/onnxruntime, or the MSE-optimal clip),
:func:`activation_error` estimates the per-example L2 quantization error of an activation from its
histogram and :func:`activation_norm` its per-example RMS L2 norm.
"""

from __future__ import annotations

import math

import numpy as np

from .numerics import ActivationQuant, _scale_zp, activation_qparams
from .stats import TensorStats

__all__ = ["activation_range", "activation_error", "activation_norm"]


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Value at quantile ``q`` (numpy's linear position (N-1)q), interpolated inside its bin."""
    n = counts.sum()
    pos = (n - 1) * q
    cum = np.cumsum(counts)
    b = int(np.searchsorted(cum, pos, side="right"))
    b = min(b, len(counts) - 1)
    before = cum[b] - counts[b]
    frac = (pos - before + 0.5) / counts[b] if counts[b] else 0.5
    return float(edges[b] + min(max(frac, 0.0), 1.0) * (edges[b + 1] - edges[b]))


def _folded(stats: TensorStats) -> np.ndarray:
    """Histogram of |x| on the same dyadic grid, bins [k w, (k+1) w), k = 0..."""
    k = np.arange(stats.bins, dtype=np.int64) + stats._start
    fold = np.where(k >= 0, k, -k - 1)
    return np.bincount(fold, weights=stats.counts, minlength=int(fold.max()) + 1).astype(np.int64)


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """onnxruntime's ``smooth_distribution``: move eps mass onto empty bins."""
    is_zero = p == 0
    n_zero = int(is_zero.sum())
    n_nonzero = p.size - n_zero
    if n_nonzero == 0:
        return None
    eps1 = eps * n_zero / n_nonzero
    return p.astype(np.float64) + eps * is_zero - eps1 * (~is_zero)


def _kl_threshold(hist: np.ndarray, nq: int) -> int:
    """TensorRT/onnxruntime entropy calibration on a one-sided histogram: best number of bins to keep."""
    hist = np.trim_zeros(np.asarray(hist), "b")
    if hist.size <= nq:
        return hist.size
    cand, kl = _kl_scores(hist, nq)
    best = int(np.argmin(kl))  # the first of equal scores, as the loop did
    return int(cand[best]) if np.isfinite(kl[best]) else hist.size


def _kl_scores(hist: np.ndarray, nq: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates [nq, len] of :func:`_kl_threshold` (``hist`` without trailing zeros, longer than
    nq) and their scores (inf: skipped).

    Candidate ``i`` in [nq, len]: p = hist[:i] with the outliers added to its last bin; q = p merged
    into ``nq`` groups of ``i // nq`` bins (the last one takes the rest) and spread evenly over each
    group's bins where p is not 0; both smoothed as onnxruntime's ``smooth_distribution``
    (:func:`_smooth`: a bin that is 0 gets eps, the others lose eps * zeros / nonzeros; a candidate
    is skipped if a smoothed q is not positive) into P and Q, of sums Sp and Sq; score
    KL(P/Sp || Q/Sq) = sum(P log(P/Q Sq/Sp)) / Sp, where all the bins where p is 0 add the same
    eps log(Sq/Sp) (P = Q = eps there).

    All candidates are scored at once (a loop over them took 65 ms per 2048-bin histogram): group
    sums and counts, smoothing constants, Sp and Sq come from prefix sums over the bins, and the
    sum over the nonzero bins is evaluated for blocks of candidates as 2-D arrays. The groups, q,
    the smoothing and the skips are exactly the loop's; the score differs from the loop's
    ``sum(P/Sp * log((P/Sp) / (Q/Sq)))`` by rounding (~1e-16), so candidates tying that closely
    may swap.
    """
    n = hist.size
    eps = 1e-4
    csum = np.concatenate([[0], np.cumsum(hist)])  # exact: integer counts
    nzsum = np.concatenate([[0], np.cumsum(hist != 0)])
    total = csum[-1]
    cand = np.arange(nq, n + 1)
    merged = cand // nq
    # the last bin of p (hist[i-1] + outliers) and the last group [(nq-1) merged, i), per candidate
    last = hist[cand - 1] + (total - csum[cand])
    last_nz = last != 0
    nnz_p = nzsum[cand - 1] + last_nz
    zeros_p = cand - nnz_p
    g0 = (nq - 1) * merged
    cnt_last = nzsum[cand - 1] - nzsum[g0] + last_nz
    q_last = (csum[cand] - csum[g0]) / np.maximum(cnt_last, 1)
    # the first nq - 1 groups depend only on the group width, which takes few values; counts are
    # non-negative, so q > 0 on every bin of a group with a nonzero bin (only the last group's sum
    # can be 0 while p is not: its last bin holds the outliers)
    widths = np.unique(merged)
    q_reg = {}
    q_min, q_sum = np.empty(widths.size), np.empty(widths.size)
    for k, w in enumerate(widths):
        bounds = np.arange(nq) * w
        cnt = np.diff(nzsum[bounds])
        q_reg[w] = q = np.diff(csum[bounds]) / np.maximum(cnt, 1)
        q_min[k] = q[cnt > 0].min() if cnt.any() else np.inf
        q_sum[k] = np.sum(cnt * q)
    wk = np.searchsorted(widths, merged)
    last_kept = (cnt_last > 0) & (q_last != 0)
    zeros_q = zeros_p + np.where(q_last == 0, cnt_last, 0)
    nnz_q = cand - zeros_q
    with np.errstate(divide="ignore", invalid="ignore"):
        e1p = eps * zeros_p / nnz_p
        e1q = eps * zeros_q / nnz_q
        skip = (nnz_p == 0) | (nnz_q == 0) | (q_min[wk] <= e1q) | (last_kept & (q_last <= e1q))
        sp = (total - nnz_p * e1p) + zeros_p * eps
        sq = (q_sum[wk] + np.where(last_kept, cnt_last * q_last, 0.0) - nnz_q * e1q) + zeros_q * eps
        ratio = sq / sp  # P/Sp over Q/Sq = P/Q * ratio: each log stays near 0, as the loop's
        q_last_s = np.where(q_last != 0, q_last - e1q, eps)  # smoothed q, constant over the last group
        p_last_s = last - e1p
        acc = zeros_p * eps * np.log(ratio)  # the bins where p is 0: P = Q = eps
        acc += np.where(last_nz, p_last_s * np.log(p_last_s / q_last_s * ratio), 0.0)
        cols = np.flatnonzero(hist)
        h_cols = hist[cols].astype(np.float64)
        ends = np.searchsorted(cols, cand - 1)  # candidate i: bins cols[:ends] lie before its last bin
        for k, w in enumerate(widths):
            rows = np.flatnonzero(merged == w)
            reg = int(np.searchsorted(cols, (nq - 1) * w))  # cols[:reg] lie in the first nq - 1 groups
            q_cols = q_reg[w][cols[:reg] // w]
            step = max(1, (1 << 16) // max(int(ends[rows[-1]]), 1))  # blocks of candidates stay in cache
            for r0 in range(0, rows.size, step):
                r = rows[r0 : r0 + step]
                ps = np.subtract(h_cols[:reg], e1p[r, None])
                qs = np.subtract(q_cols, e1q[r, None])
                np.divide(ps, qs, out=qs)
                qs *= ratio[r, None]
                np.log(qs, out=qs)
                acc[r] += np.einsum("ij,ij->i", ps, qs)
                width = int(ends[r[-1]])
                if width > reg:  # the last group: up to cols[:ends[i]], different per candidate
                    ps = np.subtract(h_cols[reg:width], e1p[r, None])
                    t = np.log(ps * (ratio / q_last_s)[r, None])
                    t *= ps
                    np.copyto(t, 0.0, where=np.arange(reg, width) >= ends[r, None])
                    acc[r] += t.sum(axis=1)
        kl = acc / sp
    kl[skip | np.isnan(kl)] = np.inf
    return cand, kl


def _levels(spec: ActivationQuant) -> int:
    return 2**spec.bits - 1 if not spec.symmetric else 2 ** (spec.bits - 1) - 1


def activation_range(stats: TensorStats, spec: ActivationQuant) -> tuple[float, float]:
    """Clip range [rmin, rmax] of an activation (before onnxruntime extends it to include 0).

    * ``minmax``: the observed extremes (exact).
    * ``percentile``: as onnxruntime, symmetric: |x| at ``percentile``; asymmetric: cut
      ``(100 - percentile) / 2`` % on each side; interpolated inside the histogram bin.
    * ``entropy``: TensorRT's KL-divergence threshold on the |x| histogram, with as many
      quantized bins as the side of the range gets levels (``2^b - 1`` for a one-sided
      asymmetric range, ``2^(b-1) - 1`` otherwise).
    * ``mse``: the clip ``(r * min, r * max)`` over a grid of ratios ``r`` minimising the expected
      squared quantization error estimated from the histogram (:func:`activation_error`).
    """
    lo, hi = stats.min, stats.max
    if spec.method == "minmax" or lo == hi:
        return lo, hi
    if not stats.histogram:
        raise ValueError(f"tensor {stats.name!r} was calibrated without a histogram: only 'minmax' ranges apply")
    cached = stats._ranges.get(spec)  # stats are immutable: a range is computed once per setting
    if cached is None:
        cached = stats._ranges[spec] = _range(stats, spec)
    return cached


def _range(stats: TensorStats, spec: ActivationQuant) -> tuple[float, float]:
    lo, hi = stats.min, stats.max
    if spec.method == "percentile":
        if spec.symmetric:
            fold = _folded(stats)
            t = _quantile(fold, stats.width * np.arange(fold.size + 1, dtype=np.float64), spec.percentile / 100.0)
            return max(lo, -t), min(hi, t)
        cut = (100.0 - spec.percentile) / 200.0
        low = _quantile(stats.counts, stats.edges, cut)
        high = _quantile(stats.counts, stats.edges, 1.0 - cut)
        return max(lo, low), min(hi, high)
    if spec.method == "entropy":
        one_sided = lo >= 0 or hi <= 0
        nq = _levels(spec) if one_sided and not spec.symmetric else 2 ** (spec.bits - 1) - 1
        fold = _folded(stats)
        fold[0] -= stats.zeros  # exact zeros are represented exactly: they must not pull the threshold
        t = _kl_threshold(fold, nq) * stats.width
        return max(lo, -t), min(hi, t)
    r = 1.0
    ratios = np.linspace(0.01, 1.0, 100)
    for _ in range(2):  # coarse grid, then a fine grid between the neighbours of the best ratio
        errors = _sq_errors(stats, ratios * lo, ratios * hi, spec)
        k = int(np.argmin(errors))
        r = float(ratios[k])
        ratios = np.linspace(ratios[max(k - 1, 0)], ratios[min(k + 1, len(ratios) - 1)], 41)
    return (lo if r == 1.0 else r * lo), (hi if r == 1.0 else r * hi)


def _sq_errors(stats: TensorStats, rmin: np.ndarray, rmax: np.ndarray, spec: ActivationQuant) -> np.ndarray:
    """:func:`_sq_error` for many ranges at once, in O(bins + ranges) instead of O(bins x ranges).

    For a range [a, b], a bin lies below a, inside, or above b, except at most two that straddle a
    or b (summed bin by bin as :func:`_sq_error` does). Inside, each count costs s^2/12. Above, a
    bin j bins past the first one, whose lower edge is c widths above b, adds
    ``m w^2 / 3 * (3 (j + c)^2 + 3 (j + c) + 1)`` (the integral of (x - b)^2 over the bin times its
    density), so the sum over those bins only needs sum(m), sum(m j) and sum(m j^2): exact integer
    prefix sums, shifted to the first bin in integers so that no floating-point cancellation
    occurs (all the remaining terms are positive). Below is the mirror image. Agrees with the
    broadcast evaluation to ~1e-13 relative (whose own cubic differences lose about that much).
    """
    rmin32, rmax32 = np.asarray(rmin, dtype=np.float32), np.asarray(rmax, dtype=np.float32)
    tmax = 2**spec.bits - 1 if not spec.signed else 2 ** (spec.bits - 1) - 1
    tmin = 0 if not spec.signed else -(2 ** (spec.bits - 1))
    qmin = -tmax if spec.symmetric and spec.signed else tmin
    scale, zp = _scale_zp(rmin32, rmax32, qmin, tmax, spec.symmetric)
    s = scale.astype(np.float64)
    a, b = (tmin - zp) * s, (tmax - zp) * s
    u, v = stats.edges[:-1], stats.edges[1:]
    w = stats.width
    m = stats.counts - np.where((u <= 0) & (v > 0), stats.zeros, 0)  # exact zeros have no error
    exact = np.int64 if int(m.sum()) * m.size**2 < 2**62 else object  # object: Python integers
    k = np.arange(m.size).astype(exact)
    mk = m.astype(exact)
    pre = [np.concatenate([[0], np.cumsum(t)]).astype(exact) for t in (mk, mk * k, mk * k * k)]
    lo_out = np.searchsorted(v, a, side="right")  # bins [0, lo_out) lie below a
    lo_in = np.searchsorted(u, a, side="left")  # bins from lo_in on start at or above a
    hi_in = np.searchsorted(v, b, side="right")  # bins [0, hi_in) end at or below b
    hi_out = np.searchsorted(u, b, side="left")  # bins [hi_out, ...) lie above b

    def tail(n0, n1, n2, c):  # sum over the bins of m w^2/3 (3 (j+c)^2 + 3 (j+c) + 1), j = 0, 1, ...
        n0, n1, n2 = (np.asarray(t, dtype=np.float64) for t in (n0, n1, n2))
        return w * w / 3.0 * (3.0 * n2 + (6.0 * c + 3.0) * n1 + (3.0 * c * c + 3.0 * c + 1.0) * n0)

    # below: j = lo_out - 1 - k, c = (a - edges[lo_out]) / w
    p0, p1, p2 = (t[lo_out] for t in pre)
    j0 = lo_out.astype(exact) - 1
    below = tail(p0, j0 * p0 - p1, j0 * j0 * p0 - 2 * j0 * p1 + p2, (a - stats.edges[lo_out]) / w)
    # above: j = k - hi_out, c = (edges[hi_out] - b) / w
    p0, p1, p2 = (t[-1] - t[hi_out] for t in pre)
    j0 = hi_out.astype(exact)
    above = tail(p0, p1 - j0 * p0, p2 - 2 * j0 * p1 + j0 * j0 * p0, (stats.edges[hi_out] - b) / w)
    inside = np.maximum(pre[0][hi_in] - pre[0][lo_in], 0).astype(np.float64)
    total = below + above + inside * s * s / 12.0
    # the bins straddling a, then b (the same bin if the range is narrower than a bin: counted once)
    for r, kk in (
        (np.flatnonzero(lo_out < lo_in), lo_out[lo_out < lo_in]),
        (np.flatnonzero(np.maximum(hi_in, lo_in) < hi_out), hi_in[np.maximum(hi_in, lo_in) < hi_out]),
    ):
        uu, vv, aa, bb, ss = u[kk], v[kk], a[r], b[r], s[r]
        dens = m[kk] / (vv - uu)
        ins = np.clip(np.minimum(vv, bb) - np.maximum(uu, aa), 0.0, None)
        abv = np.where(vv > bb, ((vv - bb) ** 3 - (np.maximum(uu, bb) - bb) ** 3) / 3.0, 0.0)
        blw = np.where(uu < aa, ((aa - uu) ** 3 - (aa - np.minimum(vv, aa)) ** 3) / 3.0, 0.0)
        total[r] += dens * (ins * ss * ss / 12.0 + abv + blw)
    return total


def _sq_error(stats: TensorStats, rmin: float, rmax: float, spec: ActivationQuant) -> float:
    """Expected total squared error over all examples: s^2/12 inside the range, distance^2 outside."""
    qp = activation_qparams(rmin, rmax, spec)
    s = float(qp.scale)
    zp = int(qp.zero_point)
    a, b = (qp.qmin - zp) * s, (qp.qmax - zp) * s
    u, v = stats.edges[:-1], stats.edges[1:]
    m = stats.counts.astype(np.float64)
    m = m - np.where((u <= 0) & (v > 0), stats.zeros, 0)  # exact zeros have no error
    dens = m / (v - u)
    inside = np.clip(np.minimum(v, b) - np.maximum(u, a), 0.0, None)
    above = np.where(v > b, ((v - b) ** 3 - (np.maximum(u, b) - b) ** 3) / 3.0, 0.0)
    below = np.where(u < a, ((a - u) ** 3 - (a - np.minimum(v, a)) ** 3) / 3.0, 0.0)
    return float(np.sum(dens * (inside * s * s / 12.0 + above + below)))


def activation_error(stats: TensorStats, rmin: float, rmax: float, spec: ActivationQuant) -> float:
    """Expected per-example L2 norm of ``a - Q(a)`` (RMS over examples) for the range [rmin, rmax]."""
    if not stats.histogram:
        raise ValueError(f"tensor {stats.name!r} was calibrated without a histogram: its error is unknown")
    return math.sqrt(max(_sq_error(stats, rmin, rmax, spec), 0.0) / stats.n_examples)


def activation_norm(stats: TensorStats) -> float:
    """Per-example RMS L2 norm of the activation: ``sqrt(sum_sq / n_examples)``."""
    return math.sqrt(stats.sum_sq / stats.n_examples)
