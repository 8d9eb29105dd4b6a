"""After writing: does the quantized model run faster than the float one on this CPU?

A short interleaved batch-1 run of both (:func:`laqonnx.latency.compare_latency`, 30 timed runs
in 5 rounds after a 5-run warm-up: well under a second on small models). A quantized model slower
than the float model (by more than :data:`NOISE_MARGIN`) gets a note with both figures, as a :class:`~laqonnx.errors.LaqonnxWarning`
and in the result's warnings: int8 does not pay on every CPU and model (per-op overhead on tiny
models, no VNNI/AMX, int4 layers onnxruntime runs unfused).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from ..errors import LaqonnxWarning
from ..latency import compare_latency

__all__ = ["NOISE_MARGIN", "LatencyCheck", "budget_note", "check_latency", "slower_note"]

# a short run on a shared machine: two identical sub-0.1 ms models differ by up to ~10% (once in a while more);
# only a quantized model slower than this factor times the float one, or past this factor of a budget, is reported
NOISE_MARGIN = 1.10


@dataclass(frozen=True)
class LatencyCheck:
    """Batch-1 median latency of the float and the written model, in milliseconds."""

    float_ms: float
    quantized_ms: float

    @property
    def ratio(self) -> float:
        return self.quantized_ms / self.float_ms if self.float_ms > 0 else float("inf")

    def to_json(self) -> dict[str, float]:
        return {"float_ms": self.float_ms, "quantized_ms": self.quantized_ms, "ratio": self.ratio}


def check_latency(float_model: onnx.ModelProto, quantized: onnx.ModelProto, input_shape: Sequence[int] | None = None,
                  *, runs: int = 30, batch: int = 1) -> LatencyCheck:
    """Interleaved medians of both models at ``batch`` (``input_shape``: without the batch dimension)."""
    res = compare_latency({"float": float_model, "quantized": quantized}, rounds=5, batch_sizes=(batch,), warmup=5,
                          runs=runs, input_shape=None if input_shape is None else tuple(input_shape))
    return LatencyCheck(res["float"].stats[0].p50_ms, res["quantized"].stats[0].p50_ms)


def budget_note(check: LatencyCheck, budget) -> str:
    """The written model's measured latency next to a :class:`~laqonnx.quant.costs.MaxLatency` budget."""
    limit = budget.limit_ms(check.float_ms)
    head = (f"the written model measures {check.quantized_ms:.3g} ms at batch {budget.batch} (float {check.float_ms:.3g} ms, "
            f"interleaved medians) against the latency budget {budget.describe()} = {limit:.3g} ms")
    if check.quantized_ms > limit * NOISE_MARGIN:
        return f"WARNING: {head}: it misses the budget (the per-layer costs are additive estimates; try a tighter budget)"
    return head


def slower_note(check: LatencyCheck, *, emit: bool = True) -> str | None:
    """The note for a quantized model slower than float (None if it is not); warned with ``emit``."""
    if check.quantized_ms <= check.float_ms * NOISE_MARGIN:
        return None
    note = (f"WARNING: the quantized model is slower than the float model on this CPU: {check.quantized_ms:.3g} ms vs "
            f"{check.float_ms:.3g} ms at batch 1 ({check.ratio:.2f}x, interleaved medians): quantization does not pay "
            "here (a model this small, a CPU without VNNI/AMX, or int4 layers onnxruntime runs unfused)")
    if emit:
        warnings.warn(note, LaqonnxWarning, stacklevel=3)
    return note
