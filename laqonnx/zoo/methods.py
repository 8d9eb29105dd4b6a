"""The quantization methods the demo and the benchmark record compare, by name.

Methods are handlers registered with :func:`method`; each takes a :class:`MethodContext` (the
float model, the calibration data, eps, the budget) and writes one model. Families:

* onnxruntime's ``quantize_static`` (``ort-minmax``, ``ort-minmax-pc``, ``ort-entropy``,
  ``ort-percentile``), and its uniform low-bit rules: ``ort-mixed`` (int4 on the largest layers,
  by parameter count, ties in graph order, until the average weight bits is at most the nominal
  budget; the achieved average ``B`` is the budget of every mixed method), ``ort-int4`` (every
  weight int4, per-channel MinMax) and ``ort-w4a4`` (int4 weights and uint4 activations);
* laqonnx with each objective, ``<objective>-<regime>``: ``laq`` (the product: both terms,
  guarded), ``mse`` and ``lipschitz`` (the ablations: one term each, unguarded), at regimes
  ``int8`` (no budget), ``mixed`` (``avg_weight_bits=B``), ``int4`` (4 bits) and ``w4a4``; a
  ``-ada`` suffix lets adaptive rounding compete as a candidate (``rounding="auto"``; without it,
  round-to-nearest only);
* ``laq-<regime>-ada-rg`` (mixed, int4, w4a4): the product with the robust guard
  (:class:`~laqonnx.quant.guard.RobustGuard`, ``--robust-guard``): it keeps the alternative most
  robust under PGD on its own mirror, ties decided by the measured loss;
* ``uniform-int4-ada``: the uniform int4 settings (per-channel max-abs weights, min-max
  activations) with adaptive rounding forced: what rounding alone buys over ``ort-int4``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LaqonnxWarning, OptionError, PlanError

__all__ = ["METHODS", "DEMO_METHODS", "RECORD_METHODS", "SWEEP_METHODS", "MethodContext", "Quantized", "method",
           "int4_rule", "ort_mixed", "quantize_method", "warm_up", "layer_sizes"]

DEMO_METHODS: tuple[str, ...] = ("float", "ort-minmax", "ort-minmax-pc", "ort-entropy", "ort-percentile",
                                 "laq-int8", "laq-latency", "ort-mixed", "laq-mixed-ada", "ort-int4", "laq-int4-ada")
RECORD_METHODS: tuple[str, ...] = (
    "float", "ort-minmax-pc", "laq-int8", "mse-int8", "lipschitz-int8",
    *(m for r in ("mixed", "int4") for m in (f"ort-{r}", *(f"{o}-{r}{a}" for o in ("laq", "mse", "lipschitz") for a in ("", "-ada")))),
    "uniform-int4-ada", "ort-w4a4", "laq-w4a4", "laq-w4a4-ada", "mse-w4a4",
)
SWEEP_METHODS: tuple[str, ...] = ("float", "ort-minmax-pc", "laq-int8", "laq-mixed-ada")  # curves of adversarial models


@dataclass(frozen=True)
class MethodContext:
    """What every method needs: the float model, where to write, calibration and budget."""

    float_path: Path
    out_dir: Path
    eps: float
    calib: str = "digits"
    calib_limit: int = 256
    budget_bits: float = 8.0  # the achieved average bits of the uniform int4 rule
    int4_weights: tuple[str, ...] = ()  # the weights the uniform rule puts at int4
    progress: bool = False
    max_latency: str = "0.85x"  # the latency-budget method's budget (of the float model, batch 1)

    def __post_init__(self) -> None:
        if not (0 < self.eps <= 1) or self.calib_limit < 1 or not 4 <= self.budget_bits <= 8:
            raise OptionError("need 0 < eps <= 1, calib_limit >= 1 and 4 <= budget_bits <= 8")


@dataclass(frozen=True)
class Quantized:
    """One method's model: file, end-to-end quantize wall time (load to write), size and bits."""

    method: str
    path: Path
    seconds: float
    avg_weight_bits: float
    size_bytes: int
    guard_kept: str | None = None  # laqonnx methods: which plan the guard kept

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "path": str(self.path)}


METHODS: dict[str, Callable[[MethodContext], Quantized]] = {}


def method(name: str) -> Callable[[Callable[[MethodContext], Quantized]], Callable[[MethodContext], Quantized]]:
    """Register a method handler under ``name``."""

    def register(fn: Callable[[MethodContext], Quantized]) -> Callable[[MethodContext], Quantized]:
        METHODS[name] = fn
        return fn

    return register


def quantize_method(name: str, ctx: MethodContext) -> Quantized:
    if name not in METHODS:
        raise OptionError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name](ctx)


# ------------------------------------------------------------------------------ the methods


def layer_sizes(path: Path) -> list[tuple[str, int]]:
    """(weight initializer, parameter count) of the weighted layers, in graph order."""
    from ..graph import load_model

    return [(layer.weight, int(np.prod(layer.weight_shape))) for layer in load_model(path).layers]


def int4_rule(sizes: Sequence[tuple[str, int]], target_bits: float) -> tuple[tuple[str, ...], float]:
    """The uniform alternative's rule: int4 on the largest layers (ties: graph order) until the
    parameter-weighted average weight bits is <= ``target_bits``. Returns (weights, achieved bits)."""
    total = sum(n for _, n in sizes)
    if total == 0:
        return (), 8.0
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][1], i))
    chosen: list[str] = []
    bits = 8.0
    for i in order:
        if bits <= target_bits + 1e-12:
            break
        chosen.append(sizes[i][0])
        bits -= 4.0 * sizes[i][1] / total
    return tuple(chosen), bits


def _calib_batches(path: Path, calib: str, limit: int) -> tuple[Any, list[np.ndarray]]:
    from ..data import open_data
    from ..graph import load_model

    pm = load_model(path)
    source = open_data(calib, input_shape=pm.input_shape, split="train", limit=limit)
    batches = [np.ascontiguousarray(x, dtype=np.float32).reshape((-1, *pm.input_shape[1:]))
               for x, _ in source.batches(32)]
    return pm, batches


def warm_up(ctx: MethodContext) -> None:
    """Load the calibration data once and import onnxruntime's quantizer before any method's clock
    starts: the first-time imports (scikit-learn's dataset loader, the quantizer; ~0.7 s) are not
    quantization time and would otherwise be charged to whichever method runs first."""
    import onnxruntime.quantization  # noqa: F401  (the first import costs ~0.7 s)

    _calib_batches(ctx.float_path, ctx.calib, ctx.calib_limit)


def _done(name: str, path: Path, t0: float, bits: float) -> Quantized:
    return Quantized(name, path, time.perf_counter() - t0, float(bits), path.stat().st_size)


@method("float")
def _float(ctx: MethodContext) -> Quantized:
    return Quantized("float", ctx.float_path, 0.0, 32.0, ctx.float_path.stat().st_size)


def _ort(name: str, baseline: str, per_channel: bool) -> None:
    @method(name)
    def run(ctx: MethodContext) -> Quantized:
        from .._util.io import save_model
        from ..quant.lower import ort_baseline

        t0 = time.perf_counter()
        pm, batches = _calib_batches(ctx.float_path, ctx.calib, ctx.calib_limit)
        with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime's entropy/percentile calibrators print
            model = ort_baseline(pm.model, pm.input_name, batches, method=baseline, per_channel=per_channel)
        out = save_model(model, ctx.out_dir / f"{name}.onnx", ctx.float_path)
        return _done(name, out, t0, 8.0)


_ort("ort-minmax", "ort-minmax", False)
_ort("ort-minmax-pc", "ort-minmax", True)
_ort("ort-entropy", "ort-entropy", False)
_ort("ort-percentile", "ort-percentile", False)


def ort_mixed(pm: Any, batches: Sequence[np.ndarray], int4_weights: Sequence[str]) -> Any:
    """onnxruntime ``quantize_static`` (QDQ, MinMax, per-channel, uint8 activations, int8 weights)
    with int4 weights on ``int4_weights``. Returns the ModelProto."""
    from ..quant.lower import ort_baseline

    return ort_baseline(pm.model, pm.input_name, batches, method="ort-minmax", per_channel=True,
                        int4_weights=int4_weights)


def _ort_int4(name: str, everything: bool) -> None:
    @method(name)
    def run(ctx: MethodContext) -> Quantized:
        from .._util.io import save_model

        t0 = time.perf_counter()
        pm, batches = _calib_batches(ctx.float_path, ctx.calib, ctx.calib_limit)
        weights = tuple(layer.weight for layer in pm.layers) if everything else ctx.int4_weights
        out = save_model(ort_mixed(pm, batches, weights), ctx.out_dir / f"{name}.onnx", ctx.float_path)
        sizes = {layer.weight: int(np.prod(layer.weight_shape)) for layer in pm.layers}
        total = sum(sizes.values())
        return _done(name, out, t0, 8.0 - 4.0 * sum(sizes[w] for w in weights) / total)


_ort_int4("ort-mixed", False)
_ort_int4("ort-int4", True)


def _ort_w4a4() -> None:
    @method("ort-w4a4")
    def run(ctx: MethodContext) -> Quantized:
        from .._util.io import save_model
        from ..quant.lower import ort_baseline

        t0 = time.perf_counter()
        pm, batches = _calib_batches(ctx.float_path, ctx.calib, ctx.calib_limit)
        model = ort_baseline(pm.model, pm.input_name, batches, method="ort-minmax", per_channel=True,
                             int4_weights=tuple(layer.weight for layer in pm.layers), activation_bits=4)
        return _done("ort-w4a4", save_model(model, ctx.out_dir / "ort-w4a4.onnx", ctx.float_path), t0, 4.0)


_ort_w4a4()

LATENCY_FALLBACK = "1.05x"  # laq-latency's budget where ctx.max_latency is infeasible

_BUDGETS: dict[str, Callable[[MethodContext], float | None]] = {
    "int8": lambda ctx: None, "mixed": lambda ctx: ctx.budget_bits, "int4": lambda ctx: 4.0, "w4a4": lambda ctx: 4.0,
    "latency": lambda ctx: None,  # a latency budget instead (ctx.max_latency)
}


def _laq(name: str, objective: str, regime: str, rounding: str, guard: Any, space: Callable[[], Any] | None = None) -> None:
    @method(name)
    def run(ctx: MethodContext) -> Quantized:
        from ..quant.metric import CandidateSpace
        from ..quant.workflow import quantize

        t0 = time.perf_counter()
        bits = _BUDGETS[regime](ctx)
        candidates = space() if space is not None else (
            CandidateSpace(weight_bits=(4,), activation_bits=(4,), rounding=rounding) if regime == "w4a4" else None)
        def go(max_latency):
            return quantize(ctx.float_path, ctx.out_dir / f"{name}.onnx", ctx.calib, eps=ctx.eps, objective=objective,
                            avg_weight_bits=None if bits is None else bits + 1e-9, calib_limit=ctx.calib_limit,
                            max_latency=max_latency, guard=guard, candidates=candidates,
                            rounding=None if candidates is not None else rounding, progress=ctx.progress)

        try:
            r = go(ctx.max_latency if regime == "latency" else None)
        except PlanError as exc:
            if regime != "latency" or "infeasible" not in str(exc):
                raise
            # a model too small for int8 to beat float: the budget the float fallback always meets
            warnings.warn(f"{name}: {exc}; using --max-latency {LATENCY_FALLBACK}", LaqonnxWarning, stacklevel=2)
            r = go(LATENCY_FALLBACK)
        q = _done(name, r.output, t0, r.avg_weight_bits)
        kept = None if r.plan.guard is None else r.plan.guard.kept
        return dataclasses.replace(q, guard_kept=kept)


for _regime in ("int8", "mixed", "int4", "w4a4"):
    for _objective in ("laq", "mse", "lipschitz"):
        _laq(f"{_objective}-{_regime}", _objective, _regime, "nearest", _objective == "laq")
        if _regime != "int8":
            _laq(f"{_objective}-{_regime}-ada", _objective, _regime, "auto", _objective == "laq")


def _uniform_ada():
    from ..quant.metric import CandidateSpace
    from ..quant.numerics import PerChannel

    return CandidateSpace(weight_bits=(4,), granularities=(PerChannel(),), weight_methods=("maxabs",),
                          activation_methods=("minmax",), rounding="adaptive")


def _robust_guard() -> Any:
    from ..quant.guard import RobustGuard

    return RobustGuard()


for _regime in ("mixed", "int4", "w4a4"):  # the guard keeping the most robust alternative (--robust-guard)
    _laq(f"laq-{_regime}-ada-rg", "laq", _regime, "auto", _robust_guard())
_laq("laq-latency", "laq", "latency", "auto", True)  # int8, 16-bit activations or float per layer within ctx.max_latency
_laq("uniform-int4-ada", "mse", "int4", "adaptive", False, _uniform_ada)
