"""Streaming calibration statistics: bounded memory whatever the number of samples.

Every tensor that will get a QDQ pair is summarised by a :class:`TensorStats`: running min/max,
number of examples, elements per example, sum of squares, count of exact zeros, and a histogram of
``bins`` bins on a *dyadic grid*: bin width ``2^e``, edges at integer multiples of it. A histogram
grows by doubling its bin width (merging pairs of bins, exact because the grids are nested) and
sliding its window; ``e`` is the smallest exponent whose window of ``bins`` bins covers the data
range, so the result depends only on the multiset of values seen. Streaming batch by batch,
merging partial results in any order, or seeing everything at once give identical histograms.
:class:`StatsCollector` accumulates them per tensor; :func:`laqonnx.quant.collect.collect` runs
the model to feed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError, ModelError, OptionError

__all__ = ["TensorStats", "StatsCollector", "DEFAULT_BINS"]

DEFAULT_BINS = 2048
_E_MIN = -200  # bin-width exponent for all-zero tensors
_REL_RES = 40  # bins never finer than 2^-40 of the largest magnitude: indices stay exact in float64


def _exponent(lo: float, hi: float, bins: int) -> int:
    """Smallest dyadic exponent (not below the magnitude floor) whose ``bins``-bin window covers [lo, hi]."""
    amax = max(abs(lo), abs(hi))
    e_floor = _E_MIN if amax == 0 else math.frexp(amax)[1] - 1 - _REL_RES
    span = hi - lo
    e = e_floor if span <= 0 else max(e_floor, math.floor(math.log2(span / bins)) - 1)
    while math.floor(math.ldexp(hi, -e)) - math.floor(math.ldexp(lo, -e)) + 1 > bins:
        e += 1
    return e


# Batches are processed in blocks whose temporaries stay in the L2 cache: on ResNet-18 activations
# (up to 25.7M elements per batch of 32) whole-array temporaries cost more in page faults and memory
# traffic than the arithmetic (from_array: 2.5 ms -> 0.8 ms per million elements). Two threads over
# the blocks gained only 1.2x on 2 cores (the short numpy calls hold the GIL): not worth a pool.
_BLOCK = 1 << 16


def _moments(flat: np.ndarray) -> tuple[float, float, float, int]:
    """Min, max (NaN if any), sum of squares (squared in the input precision, accumulated in
    float64) and number of exact zeros of a 1-D float array, in one pass over memory."""
    n = flat.size
    square = np.empty(min(n, _BLOCK), dtype=flat.dtype)
    zero = np.empty(square.size, dtype=bool)
    mins, maxs, sums, zeros = [], [], [], 0
    for s in range(0, n, _BLOCK):
        b = flat[s : s + _BLOCK]
        sq, z = square[: b.size], zero[: b.size]
        mins.append(b.min())
        maxs.append(b.max())
        np.square(b, out=sq)
        sums.append(float(sq.sum(dtype=np.float64)))
        zeros += int(np.count_nonzero(np.equal(b, 0, out=z)))  # 6x faster than counting floats
    return float(np.min(mins)), float(np.max(maxs)), float(np.sum(sums)), zeros


def _histogram(flat: np.ndarray, e: int, start: int, bins: int) -> np.ndarray:
    """Counts of ``floor(x 2^-e) - start`` over ``bins`` bins, the scaling done in the input's precision
    (a subnormal x 2^-e rounds as in float32). np.bincount is about half of the time."""
    info = np.finfo(flat.dtype)
    # x * 2^-e rounds as ldexp (one correctly rounded operation each) when 2^-e is normal, and is 2x faster
    scale = flat.dtype.type(math.ldexp(1.0, -e)) if info.minexp <= -e < info.maxexp else None
    n = flat.size
    work = np.empty(min(n, _BLOCK), dtype=flat.dtype)
    idx = np.empty(work.size, dtype=np.intp)
    counts = np.zeros(bins, dtype=np.int64)
    for s in range(0, n, _BLOCK):
        b = flat[s : s + _BLOCK]
        w, i = work[: b.size], idx[: b.size]
        if scale is not None:
            np.multiply(b, scale, out=w)
        else:
            np.ldexp(b, np.int32(-e), out=w)
        np.floor(w, out=i, casting="unsafe")  # integral values: the cast is exact
        i -= start
        counts += np.bincount(i, minlength=bins)
    return counts


@dataclass(frozen=True, eq=False)
class TensorStats:
    """Mergeable summary of one tensor over the calibration examples."""

    name: str
    min: float
    max: float
    counts: np.ndarray  # int64 (bins,)
    edges: np.ndarray  # float64 (bins + 1,), dyadic
    n_examples: int
    numel: int  # elements per example
    sum_sq: float
    zeros: int = 0  # exact zeros (representable exactly: no rounding error)
    histogram: bool = True  # False: min/max/sum_sq/zeros only (counts all 0); only "minmax" ranges apply
    _ranges: dict = field(default_factory=dict, init=False, compare=False, repr=False)  # activation_range cache

    @property
    def bins(self) -> int:
        return int(self.counts.size)

    @property
    def width(self) -> float:
        return float(self.edges[1] - self.edges[0])

    @property
    def _exp(self) -> int:
        return math.frexp(self.width)[1] - 1

    @property
    def _start(self) -> int:
        return int(round(self.edges[0] / self.width))

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @classmethod
    def from_array(cls, name: str, array: np.ndarray, bins: int = DEFAULT_BINS, histogram: bool = True) -> TensorStats:
        """Statistics of one batch (first axis = examples). ``histogram=False`` skips the histogram
        (the costly part) for tensors whose range is only ever min-max."""
        a = np.asarray(array)
        if not np.issubdtype(a.dtype, np.floating):
            raise ModelError(f"tensor {name!r} has dtype {a.dtype}: only float activations are calibrated")
        n_examples = int(a.shape[0]) if a.ndim else 1
        flat = a.reshape(-1)
        if flat.dtype not in (np.float32, np.float64):
            flat = flat.astype(np.float32)  # float16/bfloat16: exact
        if flat.size == 0 or n_examples == 0:
            raise DataError(f"tensor {name!r}: empty batch")
        lo, hi, sum_sq, zeros = _moments(flat)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = int(np.count_nonzero(~np.isfinite(flat)))
            raise DataError(f"tensor {name!r} has {bad} NaN or infinite values on the calibration data")
        e = _exponent(lo, hi, bins)
        start = math.floor(math.ldexp(lo, -e))
        counts = _histogram(flat, e, start, bins) if histogram else np.zeros(bins, dtype=np.int64)
        return cls(
            name=name,
            min=lo,
            max=hi,
            counts=counts,
            edges=np.ldexp(np.arange(start, start + bins + 1, dtype=np.float64), e),
            n_examples=n_examples,
            numel=flat.size // n_examples,
            sum_sq=sum_sq,
            zeros=zeros,
            histogram=histogram,
        )

    def _rebinned(self, e: int, start: int) -> np.ndarray:
        """Counts on the coarser grid (exponent ``e`` >= own, window starting at ``start``)."""
        nz = np.flatnonzero(self.counts)
        k = (nz.astype(np.int64) + self._start) >> (e - self._exp)
        return np.bincount(k - start, weights=self.counts[nz], minlength=self.bins).astype(np.int64)

    def merge(self, other: TensorStats) -> TensorStats:
        """Statistics of the union of both example sets (exact, associative and commutative)."""
        if other.name != self.name or other.bins != self.bins:
            raise ValueError(
                f"cannot merge stats of {self.name!r} ({self.bins} bins) and {other.name!r} ({other.bins} bins)"
            )
        if other.numel != self.numel:
            raise DataError(f"tensor {self.name!r} changed size per example: {self.numel} vs {other.numel}")
        lo, hi = min(self.min, other.min), max(self.max, other.max)
        e = max(_exponent(lo, hi, self.bins), self._exp, other._exp)
        start = math.floor(math.ldexp(lo, -e))
        return TensorStats(
            name=self.name,
            min=lo,
            max=hi,
            counts=self._rebinned(e, start) + other._rebinned(e, start),
            edges=np.ldexp(np.arange(start, start + self.bins + 1, dtype=np.float64), e),
            n_examples=self.n_examples + other.n_examples,
            numel=self.numel,
            sum_sq=self.sum_sq + other.sum_sq,
            zeros=self.zeros + other.zeros,
            histogram=self.histogram and other.histogram,
        )


class StatsCollector:
    """Accumulates :class:`TensorStats` per tensor name, one batch at a time."""

    def __init__(self, bins: int = DEFAULT_BINS):
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 16:
            raise OptionError(f"bins must be an integer >= 16, got {bins!r}")
        self.bins = bins
        self._stats: dict[str, TensorStats] = {}

    def update(self, name: str, array: np.ndarray, histogram: bool = True) -> None:
        new = TensorStats.from_array(name, array, self.bins, histogram)
        old = self._stats.get(name)
        self._stats[name] = new if old is None else old.merge(new)

    def result(self) -> dict[str, TensorStats]:
        return dict(self._stats)
