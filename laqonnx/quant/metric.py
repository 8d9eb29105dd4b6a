"""The per-layer adversarial-aware metric (version 2): its options, candidates and scores.

Every candidate setting of a layer (weight bits, granularity, range method; and of its input
tensor: the activation range method) is scored by two data-dependent terms, both in squared
centred-logit units (:mod:`laqonnx.quant.sensitivity` computes them):

* the **quantization term** ``E_x ||P J(x) delta(x)||^2``: the change the setting's error
  ``delta`` makes to the logits on clean calibration points, through the local gain ``J`` from the
  layer's output (or the tensor) to the logits at that point;
* the **adversarial term** ``E ||P (J(x') delta(x') - J(x) delta(x))||^2`` over pairs of a clean
  point and its PGD example ``x'`` on the float model: how much the setting changes the network's
  response to the attack (the Lipschitz view at the scale the data show: it contains the change
  of amplification ``J(x') T[dW] (a(x') - a(x))`` of the perturbation that actually reaches the
  layer, and the error of ranges exceeded under attack).

Objectives: ``laq`` = quantization + ``adversarial_weight`` x adversarial (the default, weight 1);
``mse`` = the quantization term only; ``lipschitz`` = the adversarial term only. Without adversarial
examples (``eps = 0`` or adversarial calibration off) the adversarial term is 0 and ``laq`` equals
``mse``. Linearised around the float network the measured loss of a quantized model (the same two
quantities measured on its outputs through onnxruntime) is the sum of its layers' and tensors'
terms, so choosing per layer (or under a budget, by the exact knapsack) minimises the prediction.
The global Lipschitz bound is not used here: it stays ``laqonnx analyze``'s certificate.

:class:`Candidate` (a layer's chosen setting), :class:`WeightScore` and :class:`ActivationScore`
(the terms of one candidate) are what the plan (:mod:`laqonnx.quant.plan`) records.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import OptionError
from ..graph import Layer
from ..vocab import ActivationMethod, Objective, Rounding, RoundingMode, ThreatNorm, WeightMethod
from .numerics import ActivationQuant, PerChannel, PerTensor, QParams, WeightQuant
from .rounding import AdaRoundConfig, Rounded

__all__ = ["OBJECTIVES", "Candidate", "WeightScore", "ActivationScore", "ObjectiveConfig", "CandidateSpace",
           "LayerTerms", "Scored", "combine"]

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
            w = f"int{self.weight.bits} {gran} {method}" + (" adaptive" if self.weight.rounding == "adaptive" else "")
        a = self.activation
        kind = ("int" if a.symmetric else "uint") + str(a.bits)
        method = a.method + (f"({a.percentile:g})" if a.method == "percentile" else "")
        return w, f"{kind} {method}"


def combine(objective: str, clean: float, adversarial: float | None, adversarial_weight: float = 1.0) -> float:
    """The value an objective minimises from a candidate's two terms (None counts as 0)."""
    adv = 0.0 if adversarial is None else float(adversarial)
    if objective == Objective.MSE:
        return float(clean)
    if objective == Objective.LIPSCHITZ:
        return adv
    return float(clean) + float(adversarial_weight) * adv


@dataclass(frozen=True)
class WeightScore:
    """The terms of one weight setting of a layer (None: left in float, no error)."""

    setting: WeightQuant | None
    clean: float  # quantization term: E ||P J T[dW] a||^2 on clean points
    adversarial: float | None  # adversarial term over (clean, adversarial) pairs; None without them
    metric: float  # what the objective minimises
    cost_bits: int  # weight bits x parameters


@dataclass(frozen=True)
class ActivationScore:
    """The terms of one activation setting of a tensor (shared by every layer that reads it)."""

    setting: ActivationQuant
    clean: float
    adversarial: float | None
    metric: float


@dataclass(frozen=True)
class ObjectiveConfig:
    """``objective``; the threat model (``eps`` in input units, ``norm``); ``adversarial_weight`` of
    the adversarial term in ``laq``; ``metric_examples``: clean calibration examples (and as many
    paired adversarial ones) on which the terms are measured; ``projections`` (None: exact logits up
    to 16 classes, else 2 random projections per example); ``seed``."""

    objective: str = "laq"
    eps: float = 8 / 255
    norm: str = "inf"
    adversarial_weight: float = 1.0
    metric_examples: int = 64
    projections: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "objective", Objective.check(self.objective, "objective"))
        object.__setattr__(self, "norm", ThreatNorm.check(self.norm, "norm"))
        if isinstance(self.eps, bool) or not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise OptionError(f"eps must be a finite number >= 0, got {self.eps!r}")
        w = self.adversarial_weight
        if isinstance(w, bool) or not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise OptionError(f"adversarial_weight must be a finite number >= 0, got {w!r}")
        m = self.metric_examples
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise OptionError(f"metric_examples must be a positive int, got {m!r}")
        p = self.projections
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise OptionError(f"projections must be None or a positive int, got {p!r}")

    def value(self, clean: float, adversarial: float | None, objective: str | None = None) -> float:
        return combine(objective or self.objective, clean, adversarial, self.adversarial_weight)


@dataclass(frozen=True)
class CandidateSpace:
    """The candidate settings (data, not code). Per-channel granularity is bound to each layer's
    output-channel axis. Without a budget only ``weight_bits`` 8 is scored (int4 and float enter
    with a budget); 16-bit activations are off by default (not fused into int8 kernels on CPU).
    ``rounding``: ``auto`` adds an adaptive-rounding copy of each int4 per-channel MSE setting
    (where rounding pays most), ``nearest`` none, ``adaptive`` makes every setting adaptive;
    ``adaround`` configures the optimisation."""

    weight_bits: tuple[int, ...] = (8, 4)
    granularities: tuple[PerTensor | PerChannel, ...] = (PerTensor(), PerChannel())
    weight_methods: tuple[str, ...] = WeightMethod.values()
    weight_percentile: float = 99.99
    activation_bits: tuple[int, ...] = (8,)
    activation_methods: tuple[str, ...] = ActivationMethod.values()
    activation_percentile: float = 99.99
    allow_float: bool = False
    default_activation: ActivationQuant = field(default_factory=ActivationQuant)
    rounding: str = "auto"
    adaround: AdaRoundConfig = field(default_factory=AdaRoundConfig)
    reduce_range: bool = False  # int8 weights in 7 bits (laqonnx.quant.int8_range)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rounding", RoundingMode.check(self.rounding, "rounding"))
        for name in ("weight_bits", "granularities", "weight_methods", "activation_bits", "activation_methods"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not value:
                raise OptionError(f"CandidateSpace.{name} must be a non-empty tuple, got {value!r}")
        if 4 in self.activation_bits and tuple(self.weight_bits) != (4,):
            raise OptionError("4-bit activations run in onnxruntime only with 4-bit weights (its int8 Conv fusion refuses "
                              "uint4 inputs): score weight_bits (4,) with activation_bits (4,)")
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
                    ws = WeightQuant(b, gran, m, self.weight_percentile, reduce_range=self.reduce_range and b == 8)
                    if self.rounding == RoundingMode.ADAPTIVE:
                        out.append(dataclasses.replace(ws, rounding=Rounding.ADAPTIVE.value))
                        continue
                    out.append(ws)
                    if (self.rounding == RoundingMode.AUTO and b == 4 and isinstance(gran, PerChannel)
                            and m == WeightMethod.MSE):
                        out.append(dataclasses.replace(ws, rounding=Rounding.ADAPTIVE.value))
        if self.allow_float and (bits is None or 32 in bits):
            out.append(None)
        return tuple(out)

    def activation_settings(self) -> tuple[ActivationQuant, ...]:
        return tuple(
            ActivationQuant(b, m, self.activation_percentile, self.default_activation.symmetric)
            for b in self.activation_bits
            for m in self.activation_methods
        )


@dataclass(frozen=True)
class LayerTerms:
    """One layer's weight candidates and their scores (and the qparams computed while scoring)."""

    layer: Layer
    scores: tuple[WeightScore, ...]
    qparams: Mapping[WeightQuant, QParams] = field(default_factory=dict, compare=False, repr=False)
    rounded: Mapping[WeightQuant, Rounded] = field(default_factory=dict, compare=False, repr=False)  # adaptive settings


@dataclass(frozen=True)
class Scored:
    """Everything :func:`laqonnx.quant.scoring.score_layers` measured."""

    layers: tuple[LayerTerms, ...]
    tensors: Mapping[str, tuple[ActivationScore, ...]]  # activation source tensor -> its activation candidates
    warnings: tuple[str, ...] = ()
    engine: str = "mirror"  # how the terms were measured (see the plan's settings)
    projections: int = 0
    exact: bool = True
    examples: int = 0
    adversarial: bool = False
    sources: Mapping[str, str] = field(default_factory=dict)  # layer input -> the tensor whose range it gets

    def source(self, tensor: str) -> str:
        return self.sources.get(tensor, tensor)

    def rescored(self, config: ObjectiveConfig, objective: str) -> "Scored":
        """The same terms with ``metric`` recomputed for another objective (the ablations)."""
        import dataclasses

        layers = tuple(
            dataclasses.replace(lt, scores=tuple(dataclasses.replace(s, metric=config.value(s.clean, s.adversarial, objective))
                                                 for s in lt.scores))
            for lt in self.layers
        )
        tensors = {t: tuple(dataclasses.replace(s, metric=config.value(s.clean, s.adversarial, objective)) for s in scores)
                   for t, scores in self.tensors.items()}
        return dataclasses.replace(self, layers=layers, tensors=tensors)
