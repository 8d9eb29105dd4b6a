"""Lipschitz stage: operator norms of weighted layers, and whole-network bounds over the graph.

:func:`operator_norm` is the L2 operator norm of a layer's linear map at its input shape
(Conv/ConvTranspose: the true convolution operator with its stride, padding, dilation and groups;
Gemm/MatMul: the spectral norm of the matrix). :func:`network_bounds` propagates bounds over the
DAG with per-op rules registered in :data:`RULES` with :func:`register_rule`.

- :mod:`.maps`: the linear maps (conv, its adjoint, circular conv, matrices) as torch functions;
- :mod:`.solvers`: explicit SVD, Lanczos, :func:`linear_map_norm`;
- :mod:`.norms`: per-op operator norms, :func:`operator_norm`, :func:`image_norm`;
- :mod:`.registry`: the bound-rule registry keyed by ``(domain, op_type)`` and :class:`~.registry.RuleContext`;
- :mod:`.rules`: the rules of the standard linear and structural ops; :mod:`.rules_nonlinear`
  (activations, self-gated products), :mod:`.rules_data` (data-dependent: products, Exp, ...),
  :mod:`.rules_resize` (Resize);
- :mod:`.calib`: calibrated value ranges for the data-dependent rules, :func:`calibrated_ranges`;
- :mod:`.network`: propagation over the graph, :func:`network_bounds`;
- :mod:`.analyze`: ``laqonnx.analyze`` and its :class:`~.analyze.Analysis` (the submodule is not
  shadowed by the function: import it from ``laqonnx.lipschitz.analyze``).
"""

from __future__ import annotations

from .maps import window_overlap
from .network import NetworkBounds, network_bounds
from .norms import image_norm, operator_norm
from .rules import RULES, DataDependent, NoRule, RuleContext, register_rule
from .solvers import EXPLICIT_MAX_INPUT, OperatorNorm, linear_map_norm

__all__ = [
    "OperatorNorm",
    "operator_norm",
    "image_norm",
    "linear_map_norm",
    "NetworkBounds",
    "network_bounds",
    "NoRule",
    "DataDependent",
    "RuleContext",
    "RULES",
    "register_rule",
    "window_overlap",
    "EXPLICIT_MAX_INPUT",
]
