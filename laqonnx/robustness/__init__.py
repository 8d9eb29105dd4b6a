"""Robustness measured on the quantized model itself.

- :mod:`.ort_estimator`: onnxruntime sessions returning logits, and ART's black-box estimator;
- :mod:`.mirror`: a differentiable PyTorch mirror of the ONNX graph (QDQ as fake-quant, STE);
- :mod:`.attacks`: the attack suite, presets and the per-example worst case;
- :mod:`.evaluate`: ``laqonnx.evaluate(...)``; :mod:`.evaldata` the data and options it reads,
  :mod:`.evalreport` the :class:`EvaluationReport` it returns and its table;
- :mod:`.shards`: (model, attack, batch) shards and their seeds; :mod:`.distributed` where they run
  (this process or Ray), :mod:`.worker` the Ray worker actor.

Submodules import torch / ART lazily; importing this package is cheap.
"""

from __future__ import annotations

__all__ = ["ort_estimator", "mirror", "attacks", "shards", "evaluate", "evaldata", "evalreport", "distributed", "worker"]
