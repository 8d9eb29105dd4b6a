"""Reference data and models for the demo, tests and benchmarks.

``laqonnx.zoo.digits`` needs only numpy and scikit-learn; the models, training, export and cache
need torch (``pip install 'laqonnx[robustness]'``) and are imported lazily. The training function
is ``laqonnx.zoo.train.train`` (the submodule ``train`` is not shadowed by the function).
``laqonnx.zoo.demo`` runs the demo and the benchmark matrix on them (behind ``laqonnx demo``).
"""

from __future__ import annotations

import importlib
from typing import Any

from .digits import load_digits

# public name -> submodule that defines it (imported on first use: torch stays optional)
_API: dict[str, str] = {
    "ARCHITECTURES": "laqonnx.zoo.models",
    "build_model": "laqonnx.zoo.models",
    "TrainConfig": "laqonnx.zoo.train",
    "TrainedModel": "laqonnx.zoo.train",
    "export_onnx": "laqonnx.zoo.export",
    "ZooModel": "laqonnx.zoo.cache",
    "get_model": "laqonnx.zoo.cache",
    "get_random_model": "laqonnx.zoo.cache",
    "default_config": "laqonnx.zoo.train",
}

__all__ = ["load_digits", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'laqonnx.zoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
