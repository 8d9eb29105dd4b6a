"""laqonnx: layer-wise adversarial-aware int8 quantization of ONNX models.

The public API is imported lazily so that ``import laqonnx`` stays cheap and a deployment install
(without torch or ART) works:

>>> import laqonnx
>>> analysis = laqonnx.analyze("model.onnx")            # per-layer Lipschitz analysis
>>> result = laqonnx.quantize("model.onnx", "model.int8.onnx", calib="digits")
>>> pm = laqonnx.load_model("model.onnx")                # or in two steps: plan, inspect, apply
>>> planned = laqonnx.plan_model(pm, "digits", laqonnx.QuantizeOptions(budget=laqonnx.AvgBits(6)))
>>> laqonnx.apply_plan("model.onnx", planned.plan, "model.mixed.onnx", "digits")
>>> report = laqonnx.evaluate(["model.int8.onnx"], data="digits", eps=8 / 255)
>>> laqonnx.deploy("model.int8.onnx", "model.e2e.onnx", image_size=32)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_API: dict[str, str] = {
    "analyze": "laqonnx.lipschitz.analyze",
    "Analysis": "laqonnx.lipschitz.analyze",
    "quantize": "laqonnx.quant.workflow",
    "QuantizeResult": "laqonnx.quant.workflow",
    "load_model": "laqonnx.graph",
    "plan_model": "laqonnx.quant.planning",
    "apply_plan": "laqonnx.quant.workflow",
    "QuantizeOptions": "laqonnx.quant.planning",
    "AvgBits": "laqonnx.quant.costs",
    "MaxBytes": "laqonnx.quant.costs",
    "Generated": "laqonnx.quant.adversarial",
    "FromData": "laqonnx.quant.adversarial",
    "Off": "laqonnx.quant.adversarial",
    "CandidateSpace": "laqonnx.quant.metric",
    "RobustGuard": "laqonnx.quant.guard",
    "evaluate": "laqonnx.robustness.evaluate",
    "EvaluationReport": "laqonnx.robustness.evaluate",
    "Ray": "laqonnx.robustness.distributed",
    "Local": "laqonnx.robustness.distributed",
    "deploy": "laqonnx.deployment",
    "LaqonnxError": "laqonnx.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'laqonnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
