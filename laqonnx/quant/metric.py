"""The per-layer adversarial-aware metric of every candidate setting.

For layer ``l`` and candidate ``s`` = (weight setting, input-activation setting)::

    M_l(s) = eps2 * D_l * (Lhat_l(s) - L_l)  +  G_l * q_l(s)
    q_l(s) = ||T_l[W_l - Q_s(W_l)]||_2 * ||a_{l-1}||  +  Lhat_l(s) * e_l(s)

``L_l`` the layer's operator norm, ``Lhat_l(s)`` with quantized weights, ``G_l`` the bound from the
layer's output to the network output, and ``D_l = dLambda/dL_l`` the derivative of the
whole-network bound with respect to the layer's norm (a central difference of
:func:`laqonnx.lipschitz.network_bounds`). On a chain ``D_l = Lambda / L_l``, so the first term is
``eps * Lambda * (Lhat/L - 1)``; on residual graphs (Lambda multilinear in the norms,
``D_l = G_l * U_l`` with ``U_l`` the bound up to the layer input) and through Concat
(``sqrt(sum L^2)``, where ``G_l * U_l`` would overstate it) the derivative is the correct first-order
coefficient, which is what makes the per-layer argmin minimise the linearised whole bound.
``||a_{l-1}||`` is the per-example RMS L2 norm of the layer input and ``e_l(s)``
the expected per-example L2 norm of its quantization error under the candidate's range, both from
the calibration histograms (clean, or clean and adversarial merged into one histogram).

Threat model: norms are L2 operator norms, so an L-inf radius is converted to the L2 ball that
contains the L-inf ball: ``eps2 = eps * sqrt(input size)``; ``--norm 2`` uses eps as is.

Objectives: ``laq`` (both terms), ``mse`` (quantization term only), ``lipschitz`` (adversarial term
only); ties go to the cheaper, then the earlier candidate. If the network bound is unknown (an op without a bound
rule) the missing ``G_l`` are taken as 1 and ``D_l`` as ``prod(L) / L_l``, with a warning.

How the norms are computed:

- ``ObjectiveConfig.norm_max_spatial`` (default 32) caps the spatial size at which conv operator
  norms are computed (all of them, float and quantized, so ratios and differences are
  consistent); the zero-padded conv norm grows slowly with the size towards its periodic limit,
  so a cap underestimates ``L_l`` a little.
- The error norms ``||T_l[W_l - Q_s(W_l)]||`` are Lanczos lower bounds converged to a looser
  relative tolerance, ``ObjectiveConfig.error_tol`` (default ``10 * tol``), warm-started from the
  previous setting's error vector of the same layer; they only enter the quantization term.
  ``L_l`` keeps ``tol``.
- ``Lhat_l`` is exact on small layers (explicit SVD, weight matrices). On Lanczos layers a small
  perturbation (``||T[W - Q(W)]|| <= first_order_max * L``, every int8 setting in practice) is
  measured on the float top singular vector with one application of the map
  (:func:`_quantized_norm`); larger perturbations (int4) run Lanczos warm-started from it.
- Settings that quantize to identical weights share their norms (:func:`_effective_qparams`).

The measurements behind these choices are in benchmarks/README.md ("History of the scoring cost").

:class:`Candidate` (one setting of a layer) and :class:`Score` (its metric terms) are what the plan
(:mod:`laqonnx.quant.plan`) records.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .._util.threads import compute_threads
from ..errors import OptionError
from ..graph import Layer, PreparedModel
from ..vocab import ActivationMethod, Objective, ThreatNorm, WeightMethod
from .numerics import ActivationQuant, PerChannel, PerTensor, QParams, WeightQuant, quantize_weight

__all__ = ["OBJECTIVES", "Candidate", "Score", "ObjectiveConfig", "CandidateSpace", "LayerTerms", "Scored", "score_layers",
           "eps_l2"]

OBJECTIVES = Objective.values()


@dataclass(frozen=True)
class Candidate:
    """One setting for a layer: its weight quantization (None: left in float) and input activation."""

    weight: WeightQuant | None
    activation: ActivationQuant

    def __post_init__(self) -> None:
        if self.weight is not None and not isinstance(self.weight, WeightQuant):
            raise OptionError(f"weight must be a WeightQuant or None, got {self.weight!r}")
        if not isinstance(self.activation, ActivationQuant):
            raise OptionError(f"activation must be an ActivationQuant, got {self.activation!r}")

    @property
    def weight_bits(self) -> int:
        return 32 if self.weight is None else self.weight.bits

    def describe(self) -> tuple[str, str]:
        """(weight, activation) as short text: 'int8 per-channel mse', 'uint8 minmax'."""
        if self.weight is None:
            w = "float"
        else:
            gran = "per-channel" if isinstance(self.weight.granularity, PerChannel) else "per-tensor"
            method = self.weight.method + (f"({self.weight.percentile:g})" if self.weight.method == "percentile" else "")
            w = f"int{self.weight.bits} {gran} {method}"
        a = self.activation
        kind = ("int" if a.symmetric else "uint") + str(a.bits)
        method = a.method + (f"({a.percentile:g})" if a.method == "percentile" else "")
        return w, f"{kind} {method}"


@dataclass(frozen=True)
class Score:
    """A candidate's metric terms for one layer (the module docstring gives the formulas)."""

    candidate: Candidate
    lhat: float  # operator norm with quantized weights
    weight_error_norm: float  # ||T[W - Q(W)]||_2
    activation_error: float  # e_l: expected per-example L2 norm of a - Q(a) of the layer input
    adversarial: float  # eps_l2 * dLambda/dL_l * (Lhat - L)
    quantization: float  # G_l * (||T[W - Q(W)]|| * ||a|| + Lhat * e)
    metric: float  # what the objective minimises
    cost_bits: int  # weight bits x parameters


@dataclass(frozen=True)
class ObjectiveConfig:
    objective: str = "laq"
    eps: float = 8 / 255
    norm: str = "inf"
    norm_max_spatial: int | None = 32
    tol: float = 1e-3
    max_iter: int = 300
    seed: int = 0
    error_tol: float | None = None  # Lanczos tolerance of the error norms ||T[W - Q(W)]||; None: 10 * tol
    # Lhat from one application on the float top vector when ||T[W - Q(W)]|| <= first_order_max * L
    # (Lanczos layers only; 0 runs Lanczos for every setting). See _quantized_norm.
    first_order_max: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "objective", Objective.check(self.objective, "objective"))
        object.__setattr__(self, "norm", ThreatNorm.check(self.norm, "norm"))
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise OptionError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if self.norm_max_spatial is not None and (not isinstance(self.norm_max_spatial, int) or self.norm_max_spatial < 1):
            raise OptionError(f"norm_max_spatial must be None or an int >= 1, got {self.norm_max_spatial!r}")
        if self.tol <= 0 or self.max_iter < 1:
            raise OptionError("tol must be > 0 and max_iter >= 1")
        if not (isinstance(self.first_order_max, (int, float)) and 0 <= self.first_order_max < 1):
            raise OptionError(f"first_order_max must be in [0, 1), got {self.first_order_max!r}")
        if self.error_tol is not None and not (isinstance(self.error_tol, (int, float)) and 0 < self.error_tol < 1):
            raise OptionError(f"error_tol must be None or in (0, 1), got {self.error_tol!r}")

    @property
    def error_norm_tol(self) -> float:
        """Relative Lanczos tolerance of the error norms (``error_tol``, default ``10 * tol``)."""
        return float(self.error_tol) if self.error_tol is not None else min(10.0 * self.tol, 0.5)


@dataclass(frozen=True)
class CandidateSpace:
    """The candidate settings (data, not code). Per-channel granularity is bound to each layer's
    output-channel axis. Without a budget only ``weight_bits`` 8 is scored (int4 and float enter
    with a budget); 16-bit activations are off by default (not fused into int8 kernels on CPU)."""

    weight_bits: tuple[int, ...] = (8, 4)
    granularities: tuple[PerTensor | PerChannel, ...] = (PerTensor(), PerChannel())
    weight_methods: tuple[str, ...] = WeightMethod.values()
    weight_percentile: float = 99.99
    activation_bits: tuple[int, ...] = (8,)
    activation_methods: tuple[str, ...] = ActivationMethod.values()
    activation_percentile: float = 99.99
    allow_float: bool = False
    default_activation: ActivationQuant = field(default_factory=ActivationQuant)

    def __post_init__(self) -> None:
        for name in ("weight_bits", "granularities", "weight_methods", "activation_bits", "activation_methods"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not value:
                raise OptionError(f"CandidateSpace.{name} must be a non-empty tuple, got {value!r}")
        # validate every combination once
        self.weight_settings(0)
        self.activation_settings()
        if self.default_activation.bits != 8:
            raise OptionError("default_activation must be 8-bit")

    def weight_settings(self, axis: int, bits: Sequence[int] | None = None) -> tuple[WeightQuant | None, ...]:
        """Weight settings for a layer whose output channels lie on ``axis`` (None = float)."""
        out: list[WeightQuant | None] = []
        for b in self.weight_bits if bits is None else [b for b in self.weight_bits if b in bits]:
            for g in self.granularities:
                gran = PerChannel(axis) if isinstance(g, PerChannel) else PerTensor()
                for m in self.weight_methods:
                    out.append(WeightQuant(b, gran, m, self.weight_percentile))
        if self.allow_float and (bits is None or 32 in bits):
            out.append(None)
        return tuple(out)

    def activation_settings(self) -> tuple[ActivationQuant, ...]:
        return tuple(
            ActivationQuant(b, m, self.activation_percentile, self.default_activation.symmetric)
            for b in self.activation_bits
            for m in self.activation_methods
        )


def eps_l2(config: ObjectiveConfig, input_shape: Sequence[int]) -> float:
    """The L2 radius the Lipschitz bounds use: eps for L2, eps * sqrt(input size) for L-inf."""
    if config.norm == "2":
        return float(config.eps)
    return float(config.eps) * math.sqrt(float(np.prod(input_shape[1:])))


@dataclass(frozen=True)
class LayerTerms:
    """Network-level quantities of one layer and the scores of its candidates."""

    layer: Layer
    operator_norm: float
    gain: float
    derivative: float  # dLambda / dL_l
    input_norm: float
    scores: tuple[Score, ...]
    qparams: Mapping[WeightQuant, QParams] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Scored:
    network_bound: float | None
    eps_l2: float
    layers: tuple[LayerTerms, ...]
    warnings: tuple[str, ...]
    norm_method: str


def _capped(layer: Layer, cap: int | None) -> Layer:
    shape = layer.input_shape
    if cap is None or shape is None or layer.op_type not in ("Conv", "ConvTranspose") or len(shape) < 3:
        return layer
    spatial = tuple(min(int(s), cap) for s in shape[2:])
    if spatial == tuple(shape[2:]):
        return layer
    return dataclasses.replace(layer, input_shape=(1, shape[1], *spatial), output_shape=None)


def _derivatives(pm: PreparedModel, norms: Mapping[str, float], lam: float | None, network_bounds) -> dict[str, float]:
    """dLambda/dL_l by a central difference of the whole-network bound (exact up to rounding where
    Lambda is multilinear in the layer norms: chains and residual sums; first order through Concat)."""
    if lam is None:
        return {}
    out: dict[str, float] = {}
    for name, L in norms.items():
        h = 1e-4 * max(L, 1e-12)
        hi = network_bounds(pm, {**norms, name: L + h}).network_bound
        lo = network_bounds(pm, {**norms, name: max(L - h, 0.0)}).network_bound
        if hi is not None and lo is not None:
            out[name] = (hi - lo) / (L + h - max(L - h, 0.0))
    return out


def _metric(objective: str, adversarial: float, quantization: float) -> float:
    if objective == "laq":
        return adversarial + quantization
    if objective == "mse":
        return quantization
    return adversarial


def _quantized_norm(layer: Layer, base, float_gain: float | None, wq: np.ndarray, error_norm: float, first_order_max: float,
                    opts: Mapping) -> float:
    """``Lhat = ||T[Q(W)]||``, warm-started from the float top vector ``v = base.vector``.

    Exact (explicit SVD / weight matrix) layers are recomputed exactly. For Lanczos layers with a
    small perturbation, ``||T[W - Q(W)]|| <= first_order_max * L``, the change is taken on ``v``
    itself: ``Lhat = L + ||T[Q(W)] v|| - ||T[W] v||`` (``float_gain = ||T[W] v||``, None where not Lanczos), which is ``L + u^T T[Q(W) - W] v`` plus a
    second-order term (``u = T[W] v / L``). Weyl bounds the whole change by the error norm, and the
    neglected part is second order in it; re-running Lanczos to ``tol`` would instead add an error
    of about ``tol * L``, larger than the int8 change itself (ResNet-18, tol 1e-3: the sign of
    ``Lhat - L`` flipped on most int8 settings against converged Lanczos; the one-step value
    stayed within 4e-5 * L of it). Larger perturbations (int4) run Lanczos from ``v``.
    """
    from ..lipschitz import image_norm, operator_norm

    if float_gain is not None and error_norm <= first_order_max * base.value:
        return base.value + image_norm(layer, wq, base.vector) - float_gain
    return operator_norm(layer, wq, init=base.vector, **opts).value


def _effective_qparams(qp: QParams, shape: Sequence[int], channel_axis: int) -> tuple:
    """A key equal for two weight settings when they quantize every output channel with the same
    scale, zero point and type, so give the same fake-quantized weight (per-tensor parameters
    broadcast to the channels, so per-tensor and an all-equal per-channel setting meet). Equal keys
    imply equal weights; the converse can fail (an all-zero channel quantizes to zeros at any
    scale), which only costs a norm computed twice."""
    channels = int(shape[channel_axis % len(shape)]) if len(shape) else 1
    scale = np.broadcast_to(np.asarray(qp.scale, dtype=np.float32).reshape(-1), (channels,))
    zp = np.broadcast_to(np.asarray(qp.zero_point, dtype=np.int64).reshape(-1), (channels,))
    return qp.bits, qp.signed, scale.tobytes(), zp.tobytes()


def score_layers(
    pm: PreparedModel,
    stats: Mapping[str, object],
    config: ObjectiveConfig,
    space: CandidateSpace,
    *,
    weight_bits: Sequence[int] | None = None,
    progress: bool = True,
) -> Scored:
    """Score every candidate of every layer. ``stats``: calibration stats per tensor
    (:func:`laqonnx.quant.collect.collect`), covering every layer input. ``weight_bits`` restricts the
    weight candidates (e.g. ``(8,)`` without a budget; 32 means float when allowed)."""
    with compute_threads():
        return _score_layers(pm, stats, config, space, weight_bits, progress)


def _score_layers(pm, stats, config, space, weight_bits, progress) -> Scored:
    from tqdm.auto import tqdm

    from ..lipschitz import image_norm, network_bounds, operator_norm
    from .ranges import activation_error, activation_norm, activation_range

    opts = dict(tol=config.tol, max_iter=config.max_iter, seed=config.seed)
    err_opts = {**opts, "tol": config.error_norm_tol}
    acts = space.activation_settings()
    warnings: list[str] = []
    # float norms, then the whole-network quantities
    capped = {layer.name: _capped(layer, config.norm_max_spatial) for layer in pm.layers}
    base = {}
    bar = tqdm(total=2 * len(pm.layers), desc="operator norms", unit="layer", disable=not progress, leave=False)
    for layer in pm.layers:
        base[layer.name] = operator_norm(capped[layer.name], pm.weight(layer), **opts)
        bar.update(1)
    norms = {name: n.value for name, n in base.items()}
    bounds = network_bounds(pm, norms)
    lam = bounds.network_bound
    if lam is None or any(bounds.gains.get(layer.name) is None for layer in pm.layers):
        why = ", ".join(bounds.unknown_ops) or "unknown"
        warnings.append(
            f"the whole-network bound is unknown (no bound rule for: {why}); missing gains are taken as 1 "
            f"and dLambda/dL_l as prod(L)/L_l"
        )
    prod_l = float(np.prod([max(v, 1e-30) for v in norms.values()]))
    derivs = _derivatives(pm, norms, lam, network_bounds)
    e2 = eps_l2(config, pm.input_shape)
    if config.norm_max_spatial is not None and any(capped[n] is not layer for n, layer in zip(capped, pm.layers)):
        warnings.append(f"conv operator norms computed at spatial size <= {config.norm_max_spatial} (norm_max_spatial)")

    # activation terms per input tensor and setting, computed once
    act_terms: dict[tuple[str, ActivationQuant], float] = {}
    in_norm: dict[str, float] = {}
    for layer in pm.layers:
        st = stats[layer.input]
        in_norm.setdefault(layer.input, float(activation_norm(st)))
        for a in acts:
            key = (layer.input, a)
            if key not in act_terms:
                rmin, rmax = activation_range(st, a)
                act_terms[key] = float(activation_error(st, rmin, rmax, a))

    out: list[LayerTerms] = []
    for layer in pm.layers:
        L = norms[layer.name]
        gain = bounds.gains.get(layer.name)
        G = 1.0 if gain is None else float(gain)
        D = derivs.get(layer.name)
        if D is None:
            D = prod_l / max(L, 1e-30)
        w = pm.weight(layer)
        weight_terms: list[tuple[WeightQuant | None, float, float]] = []
        qparams: dict[WeightQuant, QParams] = {}
        seen: dict[tuple, tuple[float, float]] = {}
        err_init = None  # error norms warm-start from the previous setting's error vector
        b = base[layer.name]
        float_gain = image_norm(capped[layer.name], w, b.vector) if b.method == "lanczos" and b.vector is not None else None
        for ws in space.weight_settings(layer.channel_axis, weight_bits):
            if ws is None:
                weight_terms.append((None, L, 0.0))
                continue
            wq, qparams[ws] = quantize_weight(w, ws)
            key = _effective_qparams(qparams[ws], w.shape, layer.channel_axis)
            if key not in seen:  # settings that quantize to the same weights share their norms
                dn = operator_norm(capped[layer.name], w - wq, init=err_init, **err_opts)
                err_init = dn.vector
                seen[key] = (_quantized_norm(capped[layer.name], b, float_gain, wq, dn.value, config.first_order_max, opts), dn.value)
            weight_terms.append((ws, *seen[key]))
        scores = []
        params = int(np.prod(layer.weight_shape))
        anorm = in_norm[layer.input]
        for ws, lhat, dnorm in weight_terms:
            for a in acts:
                e = act_terms[(layer.input, a)]
                adv = e2 * D * (lhat - L)
                quant = G * (dnorm * anorm + lhat * e)
                cand = Candidate(ws, a)
                scores.append(
                    Score(cand, lhat, dnorm, e, adv, quant, _metric(config.objective, adv, quant), cand.weight_bits * params)
                )
        out.append(LayerTerms(layer, L, G, D, anorm, tuple(scores), qparams))
        bar.update(1)
    bar.close()
    methods = sorted({n.method for n in base.values()})
    return Scored(lam, e2, tuple(out), tuple(warnings), "/".join(methods))
