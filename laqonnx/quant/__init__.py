"""Quantization stage, in pipeline order (``laqonnx.quantize`` is :func:`.workflow.quantize`).

- :mod:`.numerics`: weight/activation quantization parameters and numerics, bit-exact with ONNX;
- :mod:`.stats`: streaming, mergeable calibration statistics (dyadic histograms);
- :mod:`.collect`: :func:`~.collect.collect` runs the model on calibration batches into statistics;
- :mod:`.ranges`: activation range methods and the activation quantization error;
- :mod:`.metric`: candidate settings and the per-layer adversarial-aware metric;
- :mod:`.select`: the exact multiple-choice knapsack (per-layer argmin without a budget);
- :mod:`.costs`: the cost model of a budget and :func:`~.costs.choose`;
- :mod:`.plan`: the plan (frozen dataclasses, versioned JSON);
- :mod:`.lower`: plan -> QDQ model through onnxruntime's quantizer; onnxruntime baselines;
- :mod:`.workflow`: :func:`~.workflow.quantize`, the stages in order.

Nothing is imported here: ``laqonnx.graph`` imports :mod:`.numerics` without pulling in the rest.
"""

from __future__ import annotations

__all__: list[str] = []
