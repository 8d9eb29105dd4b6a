"""7-bit int8 weights (``reduce_range``) where onnxruntime's int8 kernels saturate: why, and the
plan's note about it. The policy (:meth:`laqonnx.latency.CpuInfo.int8_saturates`) is applied by
:func:`laqonnx.quant.workflow.quantize`; the 7-bit grid itself lives in :mod:`laqonnx.quant.numerics`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["REDUCE_RANGE_NOTE", "range_notes"]

REDUCE_RANGE_NOTE = (
    "int8 weights use 7 bits (values in [-64, 63], reduce_range): on x86 CPUs without VNNI (AVX2, AVX-512 without "
    "VNNI) onnxruntime's int8 kernels sum pairs of uint8 x int8 products in 16 bits, which saturates at full-range "
    "weights and silently corrupts the output (measured on a trained MNIST CNN: logit error 17x the fake-quant "
    "prediction; onnxruntime's own quantize_static alike)"
)


def range_notes(space, plan: Plan) -> list[str]:
    """Why int8 weights are 7-bit, or a warning that full-range ones saturate on this CPU."""
    from ..latency import cpu_info

    if not any(lp.chosen.weight is not None and lp.chosen.weight.bits == 8 for lp in plan.layers):
        return []
    if space.reduce_range:
        return [REDUCE_RANGE_NOTE]
    info = cpu_info()
    if info.int8_saturates():
        return [f"WARNING: {info.model_name} has AVX2 but no VNNI: onnxruntime's int8 kernels saturate full-range int8 "
                "weights here and can corrupt this model's outputs (reduce_range=True / --reduce-range on keeps them in 7 bits)"]
    return []
